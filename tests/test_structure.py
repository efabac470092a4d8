"""The import rules of the layout: inference never loads the training script, and no module
of the project imports one that imports it back."""
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


def test_no_import_cycle_among_the_projects_modules():
    graph = {name: project_imports(REPO / f"{name}.py") for name in MODULES}
    assert graph["test_model"] and "train_model" not in graph["test_model"]

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,)))
                   for n in graph[start])
    cycles = [name for name in MODULES if reaches(name, name)]
    assert cycles == []
    shared = {"model", "load_dataset", "preprocess", "metrics", "demo_data"}
    for name in shared:  # shared modules never import a script a user runs
        assert not graph[name] & {"train_model", "test_model"}, name


def test_benchmarks_time_the_projects_own_step_and_validation_and_take_its_defaults(monkeypatch):
    """benchmarks/pipeline.py (and gpu_check.py through it) calls the training step and the
    validation train_model runs (model.train_one_epoch and model.validate, which train_model
    imports), and takes its defaults from train_model rather than copying them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import model as model_lib
    import pipeline
    import train_model

    assert train_model.train_one_epoch is model_lib.train_one_epoch
    assert train_model.validate is model_lib.validate
    called = []
    monkeypatch.setattr(train_model, "train_one_epoch", lambda trainer, *a, **k: called.append(
        ("train", trainer.threshold)) or model_lib.EpochResult(0.5, 3, 0))
    monkeypatch.setattr(train_model, "validate",
                        lambda *a, **k: called.append(("validate",)) or {"images": 2})
    assert pipeline.train_steps(None, None, None, iter([]), 1)[0] == 3
    assert pipeline.validation_pass(None, [], None)[0] == 2
    assert called == [("train", train_model.THRESHOLD), ("validate",)]
    gpu_check = (REPO / "benchmarks" / "gpu_check.py").read_text()
    assert "train_steps" in gpu_check and "measure_validation" in gpu_check
    for path in (REPO / "benchmarks" / "pipeline.py", REPO / "benchmarks" / "gpu_check.py"):
        assigned = {t.id for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert not assigned & {"SEED", "LR", "THRESHOLD", "BATCH_SIZE", "ENCODER", "IMAGE_SIZE",
                               "WORKERS", "MIXED_PRECISION", "CHANNELS_LAST"}, path.name


def test_no_product_function_takes_more_than_seven_parameters():
    too_many = []
    for path in sorted(REPO.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs
                         if x.arg not in ("self", "cls")]
                if len(names) > 7:
                    too_many.append(f"{path.name}:{node.name} ({len(names)})")
    assert too_many == []


def test_the_names_of_a_runs_files_are_built_and_read_in_one_place():
    import model as model_lib

    files = model_lib.run_files("M", model_lib.run_stem("resnet18", fold=3))
    assert {k: p.name for k, p in files.items()} == {
        "best": "resnet18_fold3.pth", "last": "resnet18_fold3_last.pth",
        "log": "resnet18_fold3_log.csv", "curves": "resnet18_fold3_curves.png",
        "data_report": "resnet18_fold3_data.txt"}
    assert [model_lib.fold_of(p) for p in files.values()] == [3] * 5
    assert model_lib.stem_of(files["last"]) == "resnet18_fold3"
    assert model_lib.is_resume_state(files["last"]) and not model_lib.is_resume_state(files["best"])
    demo = model_lib.run_stem("resnet18", demo=True)
    assert demo == "demo_resnet18" and model_lib.fold_of(f"{demo}.pth") is None
    # the other files name no suffix of their own
    for path in list(REPO.glob("*.py")) + list(REPO.glob("benchmarks/*.py")):
        if path.name != "model.py":
            text = path.read_text()
            assert '"_last.pth"' not in text and "_fold{" not in text, path.name
