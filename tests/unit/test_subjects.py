import pytest

from shared import messages as m
from shared.subjects import (
    ADMIN, BUCKETS, CANCEL, DEMAND, INFER, PING, SLUG_RE, STREAMS, SUBJECTS, WORKER_CMD, Durability, check_token,
)


def test_format_fills_and_validates_tokens():
    assert INFER.format(worker="worker-0") == "warmserve.infer.worker-0"
    assert WORKER_CMD.format(worker="w1") == "warmserve.worker.w1.cmd"
    assert ADMIN.format(verb="model-list") == "warmserve.admin.model-list"


@pytest.mark.parametrize("bad", ["llama.2", "a b", "*", ">", "", "Upper", "-x", "x" * 65])
def test_identifiers_that_would_split_subjects_are_rejected(bad):
    with pytest.raises(ValueError):
        DEMAND.format(model=bad)


def test_missing_token_is_an_error():
    with pytest.raises(ValueError, match="missing"):
        INFER.format()


def test_check_token_accepts_slugs():
    assert check_token("llama-2-7b") == "llama-2-7b"


def test_wildcards_and_table_consistency():
    assert DEMAND.wildcard == "warmserve.demand.*"
    assert WORKER_CMD.wildcard == "warmserve.worker.*.cmd"
    names = [s.pattern for s in SUBJECTS]
    assert len(names) == len(set(names))
    for s in SUBJECTS:
        assert s.pattern.startswith("warmserve.")
        assert issubclass(s.message, m.BusMessage)


def test_every_durable_subject_is_in_a_stream():
    covered = {subj for spec in STREAMS for subj in spec.subjects}
    for s in SUBJECTS:
        if s.durability is Durability.STREAM:
            assert s.wildcard in covered, f"{s.pattern} is durable but no stream holds it"
        else:
            assert s.wildcard not in covered


def test_bucket_names_are_valid_kv_names():
    import re

    for b in BUCKETS:
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", b.name)


def test_every_subject_and_bucket_says_who_uses_it():
    from shared.subjects import OPERATOR, USERS

    for s in SUBJECTS:
        assert s.publishers, f"{s.pattern}: nobody publishes it"
        consumers = set(s.subscribers) | set(s.readers) | {u for u, _ in s.durables}
        assert consumers, f"{s.pattern}: nobody reads it"
        assert set(s.publishers) | consumers <= set(USERS), s.pattern
        assert (s.durability is Durability.CORE) == (not s.readers and not s.durables), s.pattern
        assert OPERATOR not in s.subscribers  # the operator is everywhere; listed only where services answer it
    for b in BUCKETS:
        assert b.readers, f"{b.name}: someone reads it"
        # one owner writes it, or each writer only its own key (a worker's state, a role's lease)
        assert len(b.writers) == 1 or b.keyed_by_writer, f"{b.name}: one owner writes it"


def test_a_lease_key_is_writable_by_its_own_role_only():
    from tooling.localcluster.nats_auth import permissions_of

    from shared.subjects import FORECASTER, GATEWAY, LEASES_BUCKET, ORCHESTRATOR, PLACEMENT

    for user in (PLACEMENT, ORCHESTRATOR, FORECASTER):
        allowed = permissions_of(user)["publish"]["allow"]
        lease_writes = [p for p in allowed if p.startswith(f"$KV.{LEASES_BUCKET.name}.")]
        assert lease_writes == [f"$KV.{LEASES_BUCKET.name}.{user}"], user
    assert not [p for p in permissions_of(GATEWAY)["publish"]["allow"] if p.startswith(f"$KV.{LEASES_BUCKET.name}")]


def test_permissions_are_generated_from_the_subject_table():
    from tooling.localcluster.nats_auth import ANY_WORKER_INBOX, PERMISSIONS, inbox, worker_inbox_of, worker_permissions

    gw, worker, orch = PERMISSIONS["gateway"], worker_permissions("w1"), PERMISSIONS["orchestrator"]
    assert "worker" not in PERMISSIONS  # no user shared by the workers: each has its own
    assert INFER.wildcard in gw["publish"]["allow"] and worker["subscribe"]["allow"][:4] == [
        INFER.format(worker="w1"), CANCEL.format(worker="w1"), PING.format(worker="w1"), WORKER_CMD.format(worker="w1")]
    assert PING.wildcard in gw["publish"]["allow"]  # a gateway asks a worker behind a silent stream
    assert WORKER_CMD.wildcard in orch["publish"]["allow"] and WORKER_CMD.wildcard not in gw["publish"]["allow"]
    # a responder may answer into the inboxes of the users that ask it, and only those; a worker only into
    # inboxes addressed to it (shared.bus.reply_inbox), where no other service may publish
    assert inbox("gateway") in orch["publish"]["allow"]  # scale replies
    askers = ("gateway", "orchestrator", "operator")
    assert {worker_inbox_of(u, "w1") for u in askers} <= set(worker["publish"]["allow"])
    assert not any(p.startswith("_INBOX.") and "worker" not in p for p in worker["publish"]["allow"])
    assert ANY_WORKER_INBOX in orch["publish"]["deny"] and ANY_WORKER_INBOX not in worker["publish"].get("deny", [])
    assert inbox("worker-w1") not in orch["publish"]["allow"]
    assert [p for p in worker["publish"]["allow"] if p.startswith("$KV.")] == ["$KV.warmserve-workers.w1"]
    assert not any(p.startswith("$KV.") for p in gw["publish"]["allow"])  # the gateway writes no bucket


def test_requests_to_a_worker_get_an_inbox_addressed_to_it():
    from shared.bus import reply_inbox
    from shared.subjects import SCALE, responder_worker

    assert responder_worker(INFER.format(worker="w1")) == responder_worker(WORKER_CMD.format(worker="w1")) == "w1"
    assert responder_worker(CANCEL.format(worker="w1")) is None  # no reply
    assert responder_worker(SCALE.format(model="m")) is None

    class Conn:
        def new_inbox(self):
            return "_INBOX.gateway.abc123"

    assert reply_inbox(Conn(), INFER.format(worker="w1")) == "_INBOX.gateway.worker.w1.abc123"
    assert reply_inbox(Conn(), SCALE.format(model="m")) == "_INBOX.gateway.abc123"


def test_subject_matching_follows_nats_wildcards():
    from shared.subjects import subject_matches

    assert subject_matches("warmserve.infer.*", "warmserve.infer.w1")
    assert not subject_matches("warmserve.infer.*", "warmserve.infer.w1.x")
    assert subject_matches("warmserve.admin.>", "warmserve.admin.forecast.status")
    assert not subject_matches("warmserve.admin.>", "warmserve.admin")
    assert not subject_matches("warmserve.a", "warmserve.b")


@pytest.mark.parametrize("tail", ["\n", "\r\n", " ", "\t"])
def test_every_identifier_validator_refuses_a_trailing_newline_or_space(tail, monkeypatch):
    """``re.match`` with ``$`` also matches before a final newline: "tiny\\n" once passed, was stored in the
    catalog and broke every catalog sync after it. Each validator must match the whole value."""
    from pydantic import ValidationError

    from shared import admin, bus
    from shared.settings import LocalClusterSettings, WorkerSettings

    slug, name = "tiny" + tail, "team-a" + tail
    with pytest.raises(ValueError):
        check_token(slug)
    assert SLUG_RE.match(slug) is None  # \Z: right with re.match too, which other modules use
    with pytest.raises(ValueError):
        INFER.format(worker=slug)
    for args, extra in ((admin.RegisterArgs, {"path": "/m"}), (admin.PinArgs, {}), (admin.UnpinArgs, {})):
        with pytest.raises(ValidationError):
            args(slug=slug, **extra)
    with pytest.raises(ValidationError):
        admin.WorkerArgs(worker_id=slug)
    for args in (admin.KeyArgs, admin.KeyNameArgs):
        with pytest.raises(ValidationError):
            args(name=name)
    with pytest.raises(ValidationError):
        WorkerSettings(worker_id=slug)
    for settings in (WorkerSettings, LocalClusterSettings):  # pydantic's pattern: whole string (Rust regex)
        with pytest.raises(ValidationError):
            settings(engine="sim" + tail)
    assert bus.inbox_prefix_for("gateway" + tail) == bus.INBOX_PREFIX  # not "_INBOX.gateway\n"
    assert bus.inbox_prefix_for("gateway") == "_INBOX.gateway"
