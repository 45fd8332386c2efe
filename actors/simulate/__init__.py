"""``dispatch-cloud simulate``: replay a workload through the real actors on the stub cloud.

* :mod:`.workload` — the workload format (CSV/YAML), the generator and the Arvados importer;
* :mod:`.ledger` — pure accounting: instance-hours by state, cost, lower bound, waits;
* :mod:`.runner` — one run: a :class:`actors.sim.Simulation` driven through the workload;
* :mod:`.report` — the table, the JSON and the HTML page with plots;
* :mod:`.command` — the command line.
"""
