"""The documentation agrees with the code: the site builds with every page linked, the configuration
reference is the one the config sections generate, every `--section.key` flag the README and the docs
write exists, and the code blocks marked to run do run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quartet.config.reference import STAGES, config_reference, config_rows

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
RUN_MARKER = "<!-- docs-test: run -->"
FENCE = re.compile(r"^```(\w+)\s*$")
FLAG = re.compile(r"--([a-z_]+)\.([a-z_0-9]+)")
PLACEHOLDER = "section.key"  # the docs' name for any key: `--section.key VALUE`


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block whose fence follows the run marker on the line before."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening and i > 0 and lines[i - 1].strip() == RUN_MARKER:
            end = lines.index("```", i + 1)
            blocks.append((opening.group(1), "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


def all_config_keys() -> set[str]:
    return {key.removeprefix("--") for _, _, cls in STAGES for _, rows in config_rows(cls) for key, *_ in rows}


def test_the_committed_config_reference_is_the_generated_one():
    committed = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    assert committed == config_reference(), (
        "docs/reference/config.md is out of date: run `python -m quartet.config.reference docs/reference/config.md` "
        "(make docs does)")


def test_every_config_key_has_a_description():
    missing = [f"{title}: {key}" for title, _, cls in STAGES for _, rows in config_rows(cls)
               for key, _, _, description in rows if not description.strip()]
    assert not missing, f"config keys without a description (Field(description=...)): {missing}"


def test_every_flag_in_the_readme_and_the_docs_is_a_config_key():
    keys = all_config_keys()
    assert {"train.lr", "algorithm.beta", "rollout.tools", "dpo.beta"} <= keys  # the parser reads real sections
    unknown = sorted({f"{page.relative_to(ROOT)}: --{section}.{name}"
                      for page in PAGES for section, name in FLAG.findall(page.read_text(encoding="utf-8"))
                      if f"{section}.{name}" not in keys | {PLACEHOLDER}})
    assert not unknown, f"flags that no config has (renamed or mistyped?): {unknown}"


def test_the_flag_check_would_catch_a_renamed_flag():
    assert FLAG.findall("quartet grpo --rollout.n 8 --algorithm.betta 0.1") == [("rollout", "n"), ("algorithm", "betta")]
    assert "algorithm.betta" not in all_config_keys()


def test_the_readme_is_a_front_door_and_no_page_speaks_of_paths_outside_the_repository():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    outside = re.compile(r"this round|the issue (asks|asked)|stop [0-9]+|was lent|\.\./shared", re.IGNORECASE)
    found = [f"{page.relative_to(ROOT)}:{n}" for page in PAGES
             for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not found, found


PAGES_WITH_RUNNABLE_BLOCKS = [page for page in PAGES if runnable_blocks(page.read_text(encoding="utf-8"))]


def test_runnable_blocks_are_found_where_the_docs_mark_them():
    assert {page.name for page in PAGES_WITH_RUNNABLE_BLOCKS} >= {"getting-started.md", "data-formats.md",
                                                                  "development.md"}
    text = f"a\n{RUN_MARKER}\n```bash\necho 1\n```\n\n```bash\necho 2\n```\n"
    assert runnable_blocks(text) == [("bash", "echo 1\n")]  # unmarked blocks are shown, not run


@pytest.mark.parametrize("page", PAGES_WITH_RUNNABLE_BLOCKS, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_pages_runnable_blocks_run(page: Path, tmp_path: Path):
    """A page's marked blocks run in order in one fresh directory (later blocks read what earlier ones wrote),
    `quartet` being this interpreter's `python -m quartet`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUARTET_PROGRESS": "0", "PYTHON": sys.executable}
    prelude = 'quartet() { "$PYTHON" -m quartet "$@"; }\n'
    for n, (language, code) in enumerate(runnable_blocks(page.read_text(encoding="utf-8")), 1):
        if language == "python":
            script = tmp_path / f"block_{n}.py"
            script.write_text(code, encoding="utf-8")
            cmd = [sys.executable, str(script)]
        else:
            assert language in ("bash", "sh"), f"{page.name}, block {n}: cannot run a {language} block"
            cmd = ["bash", "-euo", "pipefail", "-c", prelude + code]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page.name}, block {n} failed:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_the_docs_site_builds_with_every_page_linked(tmp_path: Path):
    """`mkdocs build --strict`: a page left out of the nav, a broken link or anchor, or an API page naming a
    missing object stops the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "run_rl" in api and "register_algorithm" in api and "exact_answer" in api
