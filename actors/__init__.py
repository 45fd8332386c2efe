"""The actor system: scheduler, queue, instance set and one worker actor per cloud VM."""
