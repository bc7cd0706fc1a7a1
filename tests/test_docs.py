"""The README and docs say what the code does: the quick start runs, the results table is the
one the recipe prints from the JSON it wrote, the test command is CI's, the snippets in the
docs run."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def load_recipe():
    spec = importlib.util.spec_from_file_location("mnist_recipe_for_docs", REPO / "recipes" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_start_runs_and_learns(capsys, one_thread):
    exec(compile(python_blocks(README)[0], "README quick start", "exec"), {})
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses


def test_the_readme_results_table_is_the_recipes_table_of_the_committed_json():
    results = json.loads((REPO / "docs" / "results" / "mnist.json").read_text())
    recipe = load_recipe()
    table = recipe.table(recipe.best_runs(results["runs"]))
    shown = README.split("<!-- results table: docs/results/mnist.json -->\n", 1)[1].split("\n\n", 1)[0]
    assert shown.strip() == table.strip()
    command = README.split("<!-- results command -->\n", 1)[1].split("\n\n", 1)[0].strip()
    config = results["config"]
    assert f"--epochs {config['epochs']}" in command or config["epochs"] == 1
    assert config["method"] == "both" and config["lr_sweep"] is None and config["seed"] == 0


def test_the_readme_test_command_is_the_one_ci_runs():
    command = "pip install torch==2.14.1 torchvision==0.29.1 -e '.[dev]' && python -m pytest"
    assert command in README
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith(command)


def test_the_readme_stays_short_and_links_every_docs_page():
    assert len(README.splitlines()) <= 260
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in README, page.name


@pytest.mark.parametrize("page", ["accelerate.md", "plugins.md"])
def test_the_snippets_of_a_docs_page_run_in_order(page, one_thread):
    namespace: dict = {}
    for block in python_blocks((REPO / "docs" / page).read_text()):
        exec(compile(block, f"docs/{page}", "exec"), namespace)


def test_every_image_the_docs_show_exists():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text()):
            assert (page.parent / image).is_file(), f"{page.name}: {image}"
