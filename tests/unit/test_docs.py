"""The docs list what the code defines: every setting, subject, stream, bucket and table."""

from pathlib import Path

from shared import settings as S
from shared.db.models import Base
from shared.subjects import BUCKETS, STREAMS, SUBJECTS

DOCS = Path(__file__).parents[2] / "docs"


def test_configuration_page_is_generated_from_the_settings():
    from shared.settings_doc import render

    page = (DOCS / "configuration.md").read_text()
    assert page == render(), "regenerate with: warmserve settings-doc > docs/configuration.md"
    for cls in (S.GatewaySettings, S.WorkerSettings, S.ForecasterSettings, S.PlacementSettings,
                S.OrchestratorSettings, S.LocalClusterSettings):
        for name in cls.model_fields:
            assert f"`WARMSERVE_{name.upper()}`" in page, f"{cls.__name__}.{name} is not documented"


def test_architecture_page_names_every_subject_stream_bucket_and_table():
    page = (DOCS / "architecture.md").read_text()
    for s in SUBJECTS:
        assert f"`{s.pattern}`" in page, s.pattern
    for spec in STREAMS:
        assert spec.name in page
    for b in BUCKETS:
        assert f"`{b.name}`" in page
    for table in Base.metadata.tables:
        assert f"`{table}`" in page
