"""ContainerStore: filter/order compilation tables, server-side rules, persistence, threads."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from cloud.clock import FakeClock
from api.arvados.store import (MAX_LIMIT, ContainerStore, NotFound, PermissionDenied, StoreError,
                                  TokenInfo, Unprocessable, check_select, compile_filters,
                                  compile_order, parse_time, rfc3339)
from tests.util import run_threads

ADMIN = "admin-token-xxxxxxxxxxxxxxxx"


@pytest.fixture
def store():
    s = ContainerStore(":memory:", cluster_id="x1234", max_dispatch_attempts=2, clock=FakeClock())
    yield s
    s.close()


@pytest.fixture
def admin(store):
    return store.authenticate(store.add_token(ADMIN, admin=True) and ADMIN)


def make(store, who, **kw):
    return store.create({"container_image": "img", "command": ["true"], **kw}, caller=who)


# -- pure compilation -------------------------------------------------------------------------------

@pytest.mark.parametrize("filters,sql,params", [
    ([["priority", ">", "0"]], "priority > ?", [0]),
    ([["priority", ">=", 2.5]], "priority >= ?", [2.5]),
    ([["lock_count", "<", "10"]], "lock_count < ?", [10]),
    ([["state", "=", "Queued"], ["priority", ">", 0]], "state = ? AND priority > ?", ["Queued", 0]),
    ([["locked_by_uuid", "=", None]], "locked_by_uuid IS NULL", []),
    ([["locked_by_uuid", "!=", None]], "locked_by_uuid IS NOT NULL", []),
    ([["locked_by_uuid", "!=", "u"]], "(locked_by_uuid != ? OR locked_by_uuid IS NULL)", ["u"]),
    ([["uuid", "in", ["a", "b"]]], "(uuid IN (?,?))", ["a", "b"]),
    ([["uuid", "in", []]], "0", []),
    ([["state", "not in", ["Complete", "Cancelled"]]], "(state NOT IN (?,?) OR state IS NULL)",
     ["Complete", "Cancelled"]),
    ([["uuid", "like", "x1234-dz642-%"]], "uuid LIKE ?", ["x1234-dz642-%"]),
    ([["state", "ILIKE", "queu%"]], "lower(state) LIKE lower(?)", ["queu%"]),
    ([["uuid", "is_a", "arvados#container"]], "1", []),
    ([["uuid", "is_a", ["arvados#collection"]]], "0", []),
    ([["containers.uuid", ">", "m"]], "uuid > ?", ["m"]),
    ([["created_at", ">=", "2023-11-14T22:13:20Z"]], "created_at >= ?", [1_700_000_000_000_000]),
    ([], "1", []),
])
def test_compile_filters(filters, sql, params):
    assert compile_filters(filters) == (sql, params)


@pytest.mark.parametrize("filters,message", [
    ("state=Queued", "filters: expected a list"),
    ([["state", "="]], r'filter \["state", "="\]: expected \[attribute, operator, operand\]'),
    ([["command", "=", "x"]], "cannot filter on attribute 'command'"),
    ([["state", "~", "x"]], "unsupported operator '~'"),
    ([["priority", ">", "high"]], "operand 'high' is not a number"),
    ([["priority", ">", True]], "operand True is not a number"),
    ([["state", "=", 3]], "operand 3 is not a string"),
    ([["state", "in", "Queued"]], "needs a list operand"),
    ([["priority", "like", "1%"]], "only applies to text"),
    ([["priority", ">", None]], "needs a non-null operand"),
    ([["created_at", ">", "yesterday"]], "invalid timestamp 'yesterday'"),
])
def test_bad_filters_name_the_problem(filters, message):
    with pytest.raises(Unprocessable, match=message) as ei:
        compile_filters(filters)
    assert ei.value.status == 422


@pytest.mark.parametrize("order,sql", [
    (None, "modified_at DESC, uuid ASC"),
    ("uuid", "uuid ASC"),
    ("priority desc", "priority DESC, uuid ASC"),
    ("priority desc, created_at", "priority DESC, created_at ASC, uuid ASC"),
    (["containers.priority desc", "uuid desc"], "priority DESC, uuid DESC"),
])
def test_compile_order(order, sql):
    assert compile_order(order) == sql


@pytest.mark.parametrize("order,message", [
    ("command", "cannot order by 'command'"),
    ("priority sideways", "invalid direction 'sideways'"),
    ("priority desc now", "invalid term"),
    ([3], "expected \"attribute"),
    ("uuid; DROP TABLE containers", "invalid term"),
    ("uuid;DROP", "cannot order by 'uuid;DROP'"),
])
def test_bad_order(order, message):
    with pytest.raises(Unprocessable, match=message):
        compile_order(order)


def test_select_and_times():
    assert check_select(["uuid", "state", "uuid"]) == ("uuid", "state")
    with pytest.raises(Unprocessable, match="select: unknown attribute 'secret'"):
        check_select(["secret"])
    with pytest.raises(Unprocessable, match="select: expected a list"):
        check_select("uuid")
    assert rfc3339(1_700_000_000_123_456) == "2023-11-14T22:13:20.123456Z"
    assert parse_time("2023-11-14T22:13:20.123456789Z", "t") == 1_700_000_000_123_456
    assert rfc3339(None) is None


# -- the store --------------------------------------------------------------------------------------

def test_tokens(store):
    uuid = store.add_token(ADMIN, admin=True)
    assert uuid.startswith("x1234-gj3su-") and len(uuid) == len("x1234-gj3su-") + 15
    assert store.authenticate(ADMIN) == TokenInfo(uuid=uuid, admin=True)
    assert store.authenticate("nope") is None and store.authenticate("") is None
    v2 = store.add_token("v2/x1234-gj3su-000000000000001/s3cret")
    assert v2 == "x1234-gj3su-000000000000001"
    assert store.authenticate("v2/x1234-gj3su-000000000000001/s3cret") == TokenInfo(v2, False)
    assert store.authenticate("s3cret") == TokenInfo(v2, False)
    assert store.authenticate("v2/x1234-gj3su-999999999999999/s3cret") is None
    # only a hash is stored
    rows = store._conn.execute("SELECT token_key FROM tokens").fetchall()
    assert all(ADMIN not in r[0] and "s3cret" not in r[0] for r in rows)


def test_create_defaults_and_shape(store, admin):
    c = make(store, admin, runtime_constraints={"vcpus": 2}, scheduling_parameters={"preemptible": True})
    assert c["uuid"].startswith("x1234-dz642-") and len(c["uuid"]) == 27
    assert c["state"] == "Queued" and c["priority"] == 1 and c["lock_count"] == 0
    assert c["created_at"] == c["modified_at"] == "2023-11-14T22:13:20.000000Z"
    assert c["runtime_status"] == {} and c["mounts"] == {} and c["exit_code"] is None
    assert c["scheduling_parameters"] == {"preemptible": True}
    with pytest.raises(Unprocessable, match="cannot create a container in state 'Locked'"):
        make(store, admin, state="Locked")
    with pytest.raises(Unprocessable, match="cannot set 'uuid' on create"):
        make(store, admin, uuid="x")
    with pytest.raises(Unprocessable, match="command: expected a list of strings"):
        make(store, admin, command="echo hi")
    with pytest.raises(Unprocessable, match="environment: values must be strings"):
        make(store, admin, environment={"A": 1})


def test_max_dispatch_attempts_zero_means_unlimited():
    s = ContainerStore(":memory:", max_dispatch_attempts=0)
    who = s.authenticate(s.add_token("t", admin=True) and "t")
    u = make(s, who)["uuid"]
    for _ in range(15):
        s.lock(u, caller=who)
        assert s.unlock(u, caller=who)["state"] == "Queued"
    s.close()


def test_lock_unlock_records(store, admin):
    u = make(store, admin)["uuid"]
    got = store.lock(u, caller=admin)
    assert set(got) == {"kind", "uuid", "state", "priority", "auth_uuid", "locked_by_uuid"}
    store.unlock(u, caller=admin)
    store.lock(u, caller=admin)
    gone = store.unlock(u, caller=admin)
    assert gone["state"] == "Cancelled"
    full = store.get(u, caller=admin)
    assert full["lock_count"] == 2 and full["finished_at"] is not None
    assert full["runtime_status"]["error"].endswith("(lock_count=2)")
    with pytest.raises(NotFound, match="container x1234-dz642-nope not found"):
        store.get("x1234-dz642-nope", caller=admin)


def test_final_states_are_frozen(store, admin):
    u = make(store, admin)["uuid"]
    store.cancel(u, caller=admin)
    with pytest.raises(Unprocessable, match="cannot update priority when Cancelled"):
        store.update(u, {"priority": 5}, caller=admin)
    assert store.update(u, {"state": "Cancelled"}, caller=admin)["state"] == "Cancelled"  # no-op


def test_limit_offset_count(store, admin):
    for _ in range(5):
        make(store, admin)
    page = store.list(limit=2, caller=admin)
    assert len(page["items"]) == 2 and page["items_available"] == 5 and page["limit"] == 2
    assert "items_available" not in store.list(count="none", caller=admin)
    assert store.list(limit=5000, caller=admin)["limit"] == MAX_LIMIT
    assert store.list(caller=admin)["limit"] == 100
    assert len(store.list(offset=4, caller=admin)["items"]) == 1
    for bad, msg in (({"limit": -1}, "limit"), ({"offset": "x"}, "offset"),
                     ({"count": "estimated"}, "count")):
        with pytest.raises(Unprocessable, match=msg):
            store.list(caller=admin, **bad)
    with pytest.raises(StoreError) as ei:
        store.list(caller=None)
    assert ei.value.status == 401


def test_like_is_case_sensitive_and_ilike_is_not(store, admin):
    make(store, admin)
    assert len(store.list([["state", "like", "Queu%"]], caller=admin)["items"]) == 1
    assert store.list([["state", "like", "queu%"]], caller=admin)["items"] == []
    assert len(store.list([["state", "ilike", "queu%"]], caller=admin)["items"]) == 1


def test_survives_close_and_reopen(tmp_path):
    db = tmp_path / "queue.sqlite"
    s = ContainerStore(str(db))
    who = s.authenticate(s.add_token(ADMIN, admin=True) and ADMIN)
    a = make(s, who, priority=3)["uuid"]
    b = make(s, who)["uuid"]
    s.lock(b, caller=who)
    s.close()
    assert sqlite3.connect(str(db)).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    s = ContainerStore(str(db))
    try:
        again = s.authenticate(ADMIN)
        assert again == who
        assert s.get(a, caller=again)["priority"] == 3
        assert s.get(b, caller=again)["state"] == "Locked"
        assert s.unlock(b, caller=again)["state"] == "Queued"
    finally:
        s.close()


def test_file_from_before_container_tokens_opens_and_locks(tmp_path):
    """A queue file made before the auth_secret column gains it on open; its queue stays usable."""
    db = tmp_path / "old.sqlite"
    s = ContainerStore(str(db))
    who = s.authenticate(s.add_token(ADMIN, admin=True) and ADMIN)
    queued, locked = make(s, who)["uuid"], make(s, who)["uuid"]
    s.lock(locked, caller=who)
    s.close()
    old = sqlite3.connect(str(db))
    old.execute("ALTER TABLE containers DROP COLUMN auth_secret")
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()
    s = ContainerStore(str(db))
    try:
        assert s.get(locked, caller=who)["state"] == "Locked"
        with pytest.raises(NotFound, match="has no token"):  # locked before tokens were kept
            s.auth(locked, caller=who)
        assert s.unlock(locked, caller=who)["state"] == "Queued"
        assert s.lock(queued, caller=who)["state"] == "Locked"
        tok = s.auth(queued, caller=who)
        assert s.authenticate(f"v2/{tok['uuid']}/{tok['api_token']}") == TokenInfo(tok["uuid"], False)
        assert sqlite3.connect(str(db)).execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        s.close()


def test_dev_store_takes_the_cluster_preemptible_settings(tmp_path):
    from dataclasses import replace

    from actors.devmode import open_store
    from tests.simcluster import cluster, instance_type
    spot = replace(instance_type(1, preemptible=True), name="type1p")
    for types, flag, want_child, spot_ok in (((spot, 2), True, True, True), ((1, 2), True, False, False),
                                            ((spot, 2), False, False, True)):
        c = cluster(types=types, containers={"always_use_preemptible_instances": flag, "max_dispatch_attempts": 3})
        s = open_store(c, str(tmp_path / f"{flag}{len(types)}{want_child}.sqlite"))
        try:
            who = s.authenticate(s.add_token(ADMIN, admin=True) and ADMIN)
            assert s.max_dispatch_attempts == 3
            parent = make(s, who)["uuid"]
            child = make(s, who, requesting_container_uuid=parent)
            assert child["scheduling_parameters"].get("preemptible", False) is want_child
            if spot_ok:
                assert make(s, who, scheduling_parameters={"preemptible": True})["state"] == "Queued"
            else:
                with pytest.raises(Unprocessable, match="preemptible instances are not configured"):
                    make(s, who, scheduling_parameters={"preemptible": True})
        finally:
            s.close()


def test_concurrent_locks_each_container_once(tmp_path):
    """Eight dispatchers race to lock the same 40 containers: each is locked exactly once."""
    s = ContainerStore(str(tmp_path / "race.sqlite"))
    root = s.authenticate(s.add_token("root", admin=True) and "root")
    uuids = [make(s, root)["uuid"] for _ in range(40)]
    callers = [s.authenticate(s.add_token(f"tok{i}", admin=True) and f"tok{i}") for i in range(8)]
    wins: dict[str, list[str]] = {}
    errors = []
    start = threading.Barrier(len(callers))

    def race(who):
        start.wait()
        for u in uuids:
            try:
                s.lock(u, caller=who)
                wins.setdefault(u, []).append(who.uuid)
                s.list([["locked_by_uuid", "=", who.uuid]], caller=who)
            except Unprocessable:
                pass
            except Exception as e:  # pragma: no cover - what the test is looking for
                errors.append(e)
    run_threads(race, [(w,) for w in callers], 20)
    try:
        assert errors == []
        assert sorted(wins) == sorted(uuids) and all(len(v) == 1 for v in wins.values())
        for u in uuids:
            row = s.get(u, caller=root)
            assert row["lock_count"] == 1 and row["locked_by_uuid"] == wins[u][0]
    finally:
        s.close()


def test_non_admin_cannot_write(store, admin):
    store.add_token("user", admin=False)
    user = store.authenticate("user")
    u = make(store, admin)["uuid"]
    assert store.get(u, caller=user)["uuid"] == u
    for call in (lambda: store.lock(u, caller=user), lambda: store.update(u, {"priority": 2}, caller=user),
                 lambda: make(store, user)):
        with pytest.raises(PermissionDenied):
            call()


def test_closed_store_says_so(tmp_path):
    s = ContainerStore(str(tmp_path / "c.sqlite"))
    s.add_token("t", admin=True)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.authenticate("t")


def test_unopenable_path_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match=r"container store .*nodir.*cannot open"):
        ContainerStore(str(tmp_path / "nodir" / "x.sqlite"))


def test_closed_store_after_reads_and_corrupt_file(tmp_path):
    s = ContainerStore(str(tmp_path / "r.sqlite"))
    s.add_token("t", admin=True)
    assert s.authenticate("t") is not None  # this thread now has a reader connection
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.authenticate("t")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"junk.sqlite: cannot open \(file is not a database\)"):
        ContainerStore(str(junk))


# -- answers rendered without reading the row back ----------------------------------------------

@pytest.mark.parametrize("path", [":memory:", "file"])
def test_write_answers_equal_what_a_read_shows(tmp_path, path):
    """lock, unlock and update render their answer from the row they read and the changes they
    wrote, not from a second SELECT: the answer must be exactly what a get shows after it,
    including the REAL columns (cost 3 reads back as 3.0) and the JSON ones."""
    s = ContainerStore(str(tmp_path / "a.db") if path == "file" else path, cluster_id="x1234",
                       clock=FakeClock())
    who = s.authenticate(s.add_token(ADMIN, admin=True) and ADMIN)
    u = make(s, who, mounts={"/tmp": {"kind": "tmp", "capacity": 1}})["uuid"]
    lock_fields = ("uuid", "state", "priority", "auth_uuid", "locked_by_uuid")

    def shown(fields=None):
        got = s.get(u, caller=who)
        return got if fields is None else {"kind": got["kind"], **{k: got[k] for k in fields}}

    assert s.lock(u, caller=who) == shown(lock_fields)
    assert s.unlock(u, caller=who) == shown(lock_fields)
    s.lock(u, caller=who)
    for fields in ({"state": "Running"}, {"cost": 3, "progress": 0.5}, {"runtime_status": {"activity": "x"}},
                   {"priority": 7, "log": "l", "output": "o", "gateway_address": "1.2.3.4:5"},
                   {}, {"state": "Complete", "exit_code": 0}):
        # as JSON: 3 == 3.0 in Python, but not on the wire
        assert json.dumps(s.update(u, fields, caller=who)) == json.dumps(shown()), fields
    assert '"cost": 3.0' in json.dumps(shown())
    s.close()


def test_list_json_is_list_as_json(store, admin):
    """The HTTP server answers a list with list_json, which splices the stored JSON text of
    object and list columns in: it must say exactly what json.dumps(list(...)) says."""
    u = make(store, admin, environment={"K": "v\u00e9\"\\n"}, mounts={"/tmp": {"kind": "tmp", "capacity": 1.5}},
             runtime_constraints={"vcpus": 2, "ram": 1 << 40}, command=["echo", "\u2603"])["uuid"]
    make(store, admin, priority=0)
    store.lock(u, caller=admin)
    store.update(u, {"state": "Running", "cost": 3, "progress": 0.25, "runtime_status": {"a": [1, None]}},
                 caller=admin)
    for kw in ({}, {"select": ["uuid", "mounts", "created_at", "started_at", "finished_at", "cost"]},
               {"select": ["command", "exit_code", "log"], "count": "none"},
               {"filters": [["state", "=", "Nothing"]]}, {"limit": 1, "offset": 1, "order": "priority"}):
        assert store.list_json(**kw, caller=admin) == json.dumps(store.list(**kw, caller=admin)), kw


def test_a_child_made_as_its_parent_is_unlocked_is_refused_not_made_preemptible(monkeypatch):
    """The container-token check and the insert are one transaction: a parent unlocked between
    them (its token expired) must not still get a child made with that token, let alone a
    preemptible one. The unlock is slipped in at the store's clock read between the two."""
    store = ContainerStore(":memory:", always_use_preemptible_instances=True, preemptible_types=True)
    store.add_token(ADMIN, admin=True)
    admin = store.authenticate(ADMIN)
    parent = store.create({"container_image": "img", "command": ["true"]}, caller=admin)["uuid"]
    store.lock(parent, caller=admin)
    a = store.auth(parent, caller=admin)
    token = store.authenticate(f"v2/{a['uuid']}/{a['api_token']}/{parent}")
    assert token is not None
    micros = store._micros

    def unlock_in_between():
        monkeypatch.setattr(store, "_micros", micros)
        store.unlock(parent, caller=admin)
        return micros()
    monkeypatch.setattr(store, "_micros", unlock_in_between)
    with pytest.raises(PermissionDenied):
        store.create({"container_image": "img", "command": ["true"]}, caller=token)
    assert [c["uuid"] for c in store.list(caller=admin)["items"]] == [parent]
    store.close()


def test_a_container_token_naming_another_container_is_refused():
    """As Arvados' api_client_authorization.rb: a v2 token's 4th part, if it names an existing
    container, must name one locked or running on that very token; a finished one, or another
    container's, makes the token fail. A 4th part naming no container is ignored."""
    store = ContainerStore(":memory:")
    store.add_token(ADMIN, admin=True)
    admin = store.authenticate(ADMIN)
    mk = lambda: store.create({"container_image": "img", "command": ["true"]}, caller=admin)["uuid"]
    a, b, queued = mk(), mk(), mk()
    for u in (a, b):
        store.lock(u, caller=admin)
    auth = store.auth(a, caller=admin)
    tok = f"v2/{auth['uuid']}/{auth['api_token']}"
    assert store.authenticate(f"{tok}/{a}") is not None
    assert store.authenticate(f"{tok}/zzzzz-dz642-000000000000000") is not None  # no such container
    assert store.authenticate(f"{tok}/{b}") is None  # B runs on another token
    assert store.authenticate(f"{tok}/{queued}") is None  # not Locked or Running
    store.close()
