"""The README and docs say what the code does: every Python block runs as pasted, the quick
start learns and prints no warning, the results table is the one the recipe prints from the
JSON it wrote, the test command is CI's."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "CONTRIBUTING.md"]
FRAGMENT = "<!-- fragment -->"  # on the line before a Python block that is not meant to run alone
BLOCK = re.compile(r"^(?:(<!-- fragment -->)\n)?```python\n(.*?)^```", flags=re.S | re.M)


def python_blocks(text: str, fragments: bool = False) -> list[str]:
    """The page's Python blocks in order; fragments (marked with FRAGMENT) only if asked."""
    return [code for marker, code in BLOCK.findall(text) if fragments or not marker]


def load_recipe():
    spec = importlib.util.spec_from_file_location("mnist_recipe_for_docs", REPO / "recipes" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_quick_start_learns_and_prints_no_warning():
    """Pasted into a fresh interpreter (torch's one-off warnings come at a process's first
    dual tensor), with FutureWarnings turned into errors."""
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", python_blocks(README)[0]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", done.stdout)]
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
    assert len(README.splitlines()) <= 250
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in README, page.name


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text(), fragments=True)],
                         ids=lambda p: p.name)
def test_every_python_block_of_a_page_runs_as_pasted(page, one_thread):
    """A page's blocks run in order in one interpreter session, as a reader pastes them;
    a fragment must still be valid Python."""
    text = page.read_text()
    for block in python_blocks(text, fragments=True):
        compile(block, page.name, "exec")
    namespace: dict = {}
    for block in python_blocks(text):
        exec(compile(block, page.name, "exec"), namespace)


def test_python_blocks_finds_blocks_and_leaves_out_fragments():
    text = "a\n```python\nx = 1\n```\n\n<!-- fragment -->\n```python\ny = x\n```\n```text\nz\n```\n"
    assert python_blocks(text) == ["x = 1\n"]
    assert python_blocks(text, fragments=True) == ["x = 1\n", "y = x\n"]


def test_no_python_hides_in_a_text_block():
    """A Python fragment is a marked Python block, not a ``text`` block the tests skip."""
    for page in PAGES:
        for block in re.findall(r"^```text\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            assert not re.search(r"^(from|import) \w|^\w+ = ", block, flags=re.M), f"{page.name}: {block}"


def test_every_image_the_docs_show_exists():
    for page in PAGES:
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text()):
            assert (page.parent / image).is_file(), f"{page.name}: {image}"


def help_texts(script: Path) -> list[str]:
    """The texts a script's argparse ``--help`` shows: string help=/description= arguments,
    and the module docstring where it is passed as the description."""
    tree = ast.parse(script.read_text())
    texts = []
    for node in ast.walk(tree):
        for keyword in getattr(node, "keywords", []) if isinstance(node, ast.Call) else []:
            if keyword.arg in ("help", "description", "epilog"):
                if isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, str):
                    texts.append(keyword.value.value)
                elif "__doc__" in ast.unparse(keyword.value):  # e.g. __doc__.splitlines()[0]
                    docstring = tree.body[0].value.value
                    texts.append(eval(ast.unparse(keyword.value), {"__doc__": docstring}))
    return texts


@pytest.mark.parametrize("script", sorted([*REPO.glob("recipes/*.py"), *REPO.glob("benchmarks/*.py")]),
                         ids=lambda p: p.name)
def test_help_texts_are_plain_text_not_rest(script):
    assert not [text for text in help_texts(script) if "``" in text]


def test_help_texts_reads_docstrings_passed_as_descriptions(tmp_path):
    script = tmp_path / "s.py"
    script.write_text('"""Uses ``x``."""\nimport argparse\np = argparse.ArgumentParser(description=__doc__.split()[0])\n'
                      'p.add_argument("--a", help="b")\n')
    assert help_texts(script) == ["Uses", "b"]
    script.write_text('"""Uses ``x``."""\nimport argparse\np = argparse.ArgumentParser(description=__doc__)\n')
    assert help_texts(script) == ["Uses ``x``."]
