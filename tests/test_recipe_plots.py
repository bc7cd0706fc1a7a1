"""recipes/mnist.py's plots: each titled with what it shows, the accuracy plot with a marker
at each evaluation."""

import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("mnist_recipe_for_plots", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_plot_has_its_own_title_and_the_accuracy_plot_marks_each_evaluation(tmp_path, monkeypatch):
    def run(method, lr, accuracy):
        return {"method": method, "lr": lr, "diverged": False, "test_accuracy": accuracy,
                "losses": [(s, 2.3 - 0.01 * s, 0.1 * s) for s in range(1, 11)],
                "evaluations": [(s, accuracy * s / 10, 0.0) for s in (0, 5, 10)]}

    runs = [run("fwdgrad", 1e-4, 0.3), run("fwdgrad", 3e-4, 0.4), run("backprop", 0.1, 0.9)]
    recipe = load_recipe()
    saved = {}

    def record(figure, path, **kwargs):
        ax = figure.axes[0]
        saved[Path(path).name] = (ax.get_title(), [line.get_marker() for line in ax.get_lines()])

    monkeypatch.setattr(Figure, "savefig", record)
    recipe.plot(runs, recipe.best_runs(runs), tmp_path, title="MNIST, paper MLP, 1 epoch")
    titles = {name: title.splitlines()[0] for name, (title, _) in saved.items()}
    assert titles == {"loss_vs_step.png": "Train loss against updates",
                      "loss_vs_time.png": "Train loss against training time",
                      "accuracy_vs_step.png": "Test accuracy against updates",
                      "lr_sweep.png": "Final test accuracy against learning rate"}
    assert all(title.endswith("MNIST, paper MLP, 1 epoch") for title, _ in saved.values())
    assert set(saved["accuracy_vs_step.png"][1]) == {"o"}
