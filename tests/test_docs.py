"""README.md and docs/ name only what exists: every relative link resolves, and every
command-line flag they name is a flag of one of the project's scripts (or of a tool named
beside it)."""
import argparse
import json
import re
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "data" / "README.md", REPO / "Model" / "README.md",
             *sorted((REPO / "docs").glob("*.md"))]
# flags of other programs the documents show beside ours
OTHER_TOOLS = {"--help",  # argparse's own, on every script
               "--standalone", "--nnodes", "--nproc_per_node", "--node_rank", "--rdzv-backend",
               "--rdzv-endpoint", "--rdzv-id", "--rdzv_backend", "--rdzv_endpoint",
               "--rdzv_id", "--master_addr", "--master_port",  # torchrun
               "--index-url", "--extra-index-url", "--no-sandbox", "--headless"}


class Parsed(Exception):
    """Raised in place of parsing, to hand back the parser a script built."""


def parser_of(parse):
    def grab(self, *args, **kwargs):
        raise Parsed(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            parse([])
        except Parsed as caught:
            return caught.args[0]
    raise AssertionError(f"{parse} built no parser")


def project_flags():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare_recipes
    import demo_data
    import encoder_speed
    import export_model
    import gpu_check
    import load_dataset
    import onnx_speed
    import pipeline
    import plain_loop
    import profile_epoch
    import screenshot_report
    import test_model
    import train_model

    parses = [train_model.parse_args, test_model.parse_args, export_model.parse_args,
              load_dataset.main, demo_data.main, compare_recipes.main, gpu_check.parse_args,
              encoder_speed.parse_args,
              onnx_speed.parse_args, pipeline.parse_args, plain_loop.parse_args,
              profile_epoch.main, screenshot_report.main]
    flags = set()
    for parse in parses:
        for action in parser_of(parse)._actions:
            flags.update(action.option_strings)
    return flags


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert broken == []


def test_every_flag_named_is_a_flag_of_a_script():
    known = project_flags() | OTHER_TOOLS
    unknown = []
    for doc in DOCUMENTS:
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", doc.read_text()))):
            if flag not in known:
                unknown.append(f"{doc.relative_to(REPO)}: {flag}")
    assert unknown == []


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_a_document_speaks_of_the_project_as_it_is(doc):
    """No placeholders left for figures that were never filled in."""
    text = doc.read_text()
    assert "<!--" not in text and "TODO" not in text


def test_the_settings_tables_of_docs_settings_md_are_the_scripts_tables():
    """`python settings.py` writes them; this fails when a row changed and it was not run."""
    import export_model
    import settings
    import test_model
    import train_model

    tables = {f"{m.__name__}.py": settings.describe(m.SETTINGS, vars(m))
              for m in (train_model, test_model, export_model)}
    text = (REPO / "docs" / "settings.md").read_text()
    assert text[text.index(settings.DOC_MARK):] == settings.markdown(
        json.loads(json.dumps(tables))), "docs/settings.md is out of date: run python settings.py"
