"""The container API in process: :class:`ContainerApi` over a :class:`~api.arvados.store.ContainerStore`
called directly, for simulations and dev tools that cannot afford HTTP for thousands of
containers. Same methods, same errors as :class:`~api.arvados.client.ArvadosClient`."""

from __future__ import annotations

from collections.abc import Callable

from api.arvados.client import ContainerApi, Unauthorized, error_for
from api.arvados.store import StoreError


class LocalArvadosClient(ContainerApi):
    """The same API calling a ContainerStore directly (simulations, dev tools). Same errors."""

    def __init__(self, store, token: str):
        super().__init__()
        self._store = store
        self._token = token
        self.last_503: float | None = None

    def __repr__(self) -> str:
        return f"LocalArvadosClient({self._store.path!r})"

    def _call(self, fn: Callable, *args, **kwargs) -> dict:
        try:
            who = self._store.authenticate(self._token)
            if who is None:
                raise Unauthorized(401, "Not logged in")
            return fn(*args, **kwargs, caller=who)
        except StoreError as e:
            raise error_for(e.status, e.message) from e

    def _current(self) -> dict:
        return self._call(lambda caller: {"kind": "arvados#apiClientAuthorization", "uuid": caller.uuid})

    def _list(self, params: dict) -> dict:
        return self._call(self._store.list, **params)

    def _get(self, uuid: str, select) -> dict:
        return self._call(self._store.get, uuid, select)

    def _lock(self, uuid: str) -> dict:
        return self._call(self._store.lock, uuid)

    def _unlock(self, uuid: str) -> dict:
        return self._call(self._store.unlock, uuid)

    def _update(self, uuid: str, fields: dict) -> dict:
        return self._call(self._store.update, uuid, fields)

    def _create(self, fields: dict) -> dict:
        return self._call(self._store.create, fields)

    def _auth(self, uuid: str) -> dict:
        return self._call(self._store.auth, uuid)
