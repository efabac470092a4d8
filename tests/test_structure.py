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


def test_benchmarks_time_the_training_scripts_own_loops_and_defaults(monkeypatch):
    """benchmarks/pipeline.py (and gpu_check.py through it) calls train_model's training step
    and validation, and takes its defaults from train_model rather than copying them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import pipeline
    import train_model

    called = []
    monkeypatch.setattr(train_model, "train_one_epoch",
                        lambda *a, stats, **k: called.append("train") or stats.update(images=3))
    monkeypatch.setattr(train_model, "validate",
                        lambda *a, **k: called.append("validate") or {"images": 2})
    assert pipeline.train_steps(None, None, None, iter([]), 1)[0] == 3
    assert pipeline.validation_pass(None, [], None)[0] == 2
    assert called == ["train", "validate"]
    gpu_check = (REPO / "benchmarks" / "gpu_check.py").read_text()
    assert "train_steps" in gpu_check and "measure_validation" in gpu_check
    for path in (REPO / "benchmarks" / "pipeline.py", REPO / "benchmarks" / "gpu_check.py"):
        assigned = {t.id for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert not assigned & {"SEED", "LR", "THRESHOLD", "BATCH_SIZE", "ENCODER", "IMAGE_SIZE",
                               "WORKERS", "MIXED_PRECISION", "CHANNELS_LAST"}, path.name
