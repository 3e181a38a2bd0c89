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


ROOT = DOCS.parent
SOURCES = [p for pkg in ("shared", "services", "tooling", "simulator", "loadtest", "tests", "docs", "infra")
           for p in (ROOT / pkg).rglob("*") if p.suffix in {".py", ".md", ".conf", ".yml", ".yaml"}]
SOURCES += [ROOT / "README.md", ROOT / "docker-compose.yml", ROOT / "pyproject.toml"]


def test_nothing_relies_on_design_notes_outside_the_repository():
    """A user's clone has docs/design.md, not the developers' notes: no reference may point elsewhere."""
    outside = "DESIGN" + ".md"  # spelled apart so this file does not match itself
    for path in SOURCES:
        text = path.read_text(errors="replace")
        assert outside not in text and "DESIGN " + "2." not in text, f"{path} cites notes a clone does not have"
        assert "../" + "shared" not in text, f"{path} reads outside the repository"


def test_design_references_name_sections_that_exist():
    import re

    headings = set(re.findall(r"^## (.+)$", (DOCS / "design.md").read_text(), flags=re.M))
    cited = set()
    for path in SOURCES:
        for m in re.finditer(r"docs/design\.md[,(]? ?\(?[\"']([^\"']+)[\"']", path.read_text(errors="replace")):
            cited.add((m.group(1), path.name))
    assert cited, "the check found no references at all"
    missing = {(section, where) for section, where in cited if section not in headings}
    assert not missing, f"references to sections docs/design.md does not have: {sorted(missing)}"
