import pytest

from shared import messages as m
from shared.subjects import (
    ADMIN, BUCKETS, DEMAND, INFER, STREAMS, SUBJECTS, WORKER_CMD, Durability, check_token,
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
