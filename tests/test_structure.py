"""The rules of the layout: inference never loads the training script, no script imports
another script, no module imports one that imports it back, and every function stays short."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in REPO.glob("*.py"))


def project_imports(path):
    """The project's modules that a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_test_model_runs_without_the_training_script():
    code = "import sys, test_model; print('train_model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


SCRIPTS = {"train_model", "test_model", "export_model"}  # what a user runs; nothing imports them


def test_no_import_cycle_among_the_projects_modules_and_no_script_imported():
    graph = {name: project_imports(REPO / f"{name}.py") for name in MODULES}
    assert graph["test_model"] and "train_model" not in graph["test_model"]

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,)))
                   for n in graph[start])
    cycles = [name for name in MODULES if reaches(name, name)]
    assert cycles == []
    for name in MODULES:  # a script never imports another script, a module never a script
        assert not graph[name] & SCRIPTS, name
    for path in (REPO / "benchmarks").glob("*.py"):  # the benchmarks use the modules
        assert not project_imports(path) & SCRIPTS, path.name
    # the layout's never-rules: preprocessing knows no data scan, the network no training
    assert "load_dataset" not in graph["preprocess"]
    assert not graph["model"] & {"engine", "device", "checkpoint", "predict"}
    assert "engine" not in graph["predict"]


def test_benchmarks_time_the_engines_step_and_validation_with_train_models_defaults(
        monkeypatch):
    """benchmarks/pipeline.py (and gpu_check.py through it) calls the training step and the
    validation train_model runs (engine.train_one_epoch and engine.validate), and measures by
    default the run train_model's constants describe: it reads them from `train_model.py
    --print-settings`, and no benchmark assigns a constant of train_model's SETTINGS."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import engine
    import pipeline
    import train_model

    called = []
    monkeypatch.setattr(engine, "train_one_epoch", lambda trainer, *a, **k: called.append(
        ("train", trainer.threshold)) or engine.EpochResult(0.5, 3, 0))
    monkeypatch.setattr(engine, "validate",
                        lambda *a, **k: called.append(("validate",)) or {"images": 2})
    assert pipeline.train_steps(None, None, None, iter([]), 1)[0] == 3
    assert pipeline.validation_pass(None, [], None)[0] == 2
    assert called == [("train", train_model.THRESHOLD), ("validate",)]
    gpu_check = (REPO / "benchmarks" / "gpu_check.py").read_text()
    assert "train_steps" in gpu_check and "measure_validation" in gpu_check
    names = {s.name for s in train_model.SETTINGS}
    for path in (REPO / "benchmarks").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            assigned = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            assert not assigned & names, f"{path.name} copies {assigned & names}"


def functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_takes_more_than_seven_parameters_or_runs_past_sixty_lines():
    too_many, too_long = [], []
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("benchmarks/*.py")):
        for node in functions(path):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs
                     if x.arg not in ("self", "cls")]
            if len(names) > 7:
                too_many.append(f"{path.name}:{node.name} ({len(names)})")
            if node.end_lineno - node.lineno + 1 > 60:
                too_long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert too_many == [] and too_long == []


def test_the_names_of_a_runs_files_are_built_and_read_in_one_place():
    import checkpoint

    files = checkpoint.run_files("M", checkpoint.run_stem("FPN", "resnet18", fold=3))
    assert {k: p.name for k, p in files.items()} == {
        "best": "fpn_resnet18_fold3.pth", "last": "fpn_resnet18_fold3_last.pth",
        "log": "fpn_resnet18_fold3_log.csv", "curves": "fpn_resnet18_fold3_curves.png",
        "data_report": "fpn_resnet18_fold3_data.txt"}
    assert [checkpoint.fold_of(p) for p in files.values()] == [3] * 5
    assert checkpoint.stem_of(files["last"]) == "fpn_resnet18_fold3"
    assert checkpoint.is_resume_state(files["last"]) and \
        not checkpoint.is_resume_state(files["best"])
    demo = checkpoint.run_stem("FPN", "resnet18", demo=True)
    assert demo == "demo_fpn_resnet18" and checkpoint.fold_of(f"{demo}.pth") is None
    # two architectures on one encoder never share a file
    unet = checkpoint.run_stem("Unet", "resnet18", fold=3)
    assert unet == "unet_resnet18_fold3" and checkpoint.fold_of(f"{unet}_last.pth") == 3
    name = checkpoint.RUN_STEM.match("deeplabv3plus_efficientnet-b3_fold1")
    assert (name["arch"], name["encoder"], name["fold"]) == ("deeplabv3plus", "efficientnet-b3",
                                                              "1")
    # the other files name no suffix of their own
    for path in list(REPO.glob("*.py")) + list(REPO.glob("benchmarks/*.py")):
        if path.name != "checkpoint.py":
            text = path.read_text()
            assert '"_last.pth"' not in text and "_fold{" not in text, path.name


def test_no_source_file_is_parsed_at_run_time_and_no_import_waits_below_code():
    """Settings come from a table, not from reading a script's source; in the top-level files
    the imports come first (a benchmark puts the repository on sys.path before its own)."""
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("benchmarks/*.py")):
        text = path.read_text()
        assert "import tokenize" not in text and "__file__).read_text" not in text, path.name
        if path.parent == REPO:
            assert "noqa: E402" not in text, path.name
