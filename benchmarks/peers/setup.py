"""Build the virtualenvs in which the checkpoint benchmark runs its peers (PyTorch Lightning, MosaicML Composer).

The peers are measured, never depended on: each lives in its own venv under ``benchmarks/.peers/<name>/`` so that
neither cairn's environment nor its dependency pins ever see them. Every pip command here carries ``torch==2.13.0``
(on its command line and in a constraints file), because an unpinned resolve would fetch a multi-GB CUDA torch
instead of the CPU wheel this machine has, and the numbers must come from the same torch that cairn runs on.

Run as ``python benchmarks/peers/setup.py lightning composer``; ``ensure_peer`` is idempotent thanks to a stamp
file that records exactly what the venv was built from (a changed recipe rebuilds the venv from scratch).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

PEERS_ROOT = Path(__file__).resolve().parents[1] / ".peers"
TORCH_PIN = "torch==2.13.0"
STAMP = "cairn-peer-stamp.json"
CONSTRAINTS = "cairn-constraints.txt"

# Composer 0.32.1 imports torchvision at module level (and torchmetrics then imports more of it), but no PyPI
# torchvision loads beside torch 2.13 ("operator torchvision::nms does not exist"), and the checkpoint path needs
# none of it. So the composer venv gets a stand-in package that defines exactly the names imported while
# ``from composer import Trainer`` runs and while a Trainer is built (it imports ``composer.algorithms`` then):
# module (relative to torchvision) -> names. Using any of them raises.
TORCHVISION_STAND_IN: dict[str, tuple[str, ...]] = {
    "": (),
    "datasets": ("VisionDataset",),
    "models": ("VGG16_Weights", "resnet50", "vgg16"),
    "models.resnet": ("Bottleneck",),
    "ops": ("box_area", "box_convert", "box_iou", "complete_box_iou", "distance_box_iou", "generalized_box_iou"),
    "transforms": ("Compose", "ToTensor"),
    "transforms.functional": ("resize", "to_pil_image"),
    "utils": ("draw_segmentation_masks",),
}


@dataclass(frozen=True)
class PeerRecipe:
    """What one peer venv is built from; its JSON form is hashed into the stamp."""

    requirements: tuple[str, ...]
    """Installed through pip's resolver, beside ``TORCH_PIN``."""
    imports: tuple[str, ...]
    """Modules that must import in the venv afterwards (the first one's ``__version__`` is logged): the proof that
    the framework loads beside this torch, which pip cannot give for packages installed with ``--no-deps``."""
    no_deps: tuple[str, ...] = ()
    """Installed with ``--no-deps``: packages whose declared torch range excludes 2.13 but which run on it."""
    torchvision_stand_in: bool = False


RECIPES: dict[str, PeerRecipe] = {
    "lightning": PeerRecipe(requirements=("lightning==2.6.6",), imports=("lightning", "lightning.pytorch")),
    # mosaicml pins torch<2.7.1, hence --no-deps; the light dependencies below are those that importing composer,
    # composer.Trainer and composer.algorithms needs (found by importing them and reading the errors), kept inside
    # mosaicml's declared ranges. Left out on purpose: torchvision (stand-in) and torch_optimizer (never imported).
    "composer": PeerRecipe(
        requirements=(
            "numpy>=1.21.5,<2.3.0",
            "torchmetrics>=1.0,<1.7.5",
            "mosaicml-cli>=0.5.25,<0.8",
            "coolname>=1.1.0,<3",
            "importlib-metadata>=5.0.0,<9",
            "py-cpuinfo>=8.0.0,<10",
            "psutil>=5.8.0,<8",
            "packaging>=21.3.0,<25.1",
            "pillow>=10.3.0,<12",
            "pyyaml>=6.0,<7",
            "requests>=2.26.0,<3",
            "tabulate==0.9.0",
            "tqdm>=4.62.3,<5",
        ),
        imports=("composer", "composer.trainer", "composer.algorithms"),
        no_deps=("mosaicml==0.32.1",),
        torchvision_stand_in=True,
    ),
}

_STAND_IN_ROOT = '''"""Not torchvision: a stand-in by cairn's benchmarks/peers/setup.py so that composer imports."""

__version__ = "0.0.0+cairn.stand.in"


class Unavailable:
    """Base of every name here: a class, so it can be subclassed or isinstance-checked, but never used."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{type(self).__name__}: torchvision is only a stand-in in this benchmark venv")
'''


def _stand_in_files() -> dict[str, str]:
    """The stand-in torchvision as {path relative to site-packages: source}; every module is a package directory."""
    files = {"torchvision/__init__.py": _STAND_IN_ROOT}
    for module, names in TORCHVISION_STAND_IN.items():
        if module:
            classes = "\n\n\n".join(f"class {name}(Unavailable): ..." for name in names)
            source = f"from torchvision import Unavailable\n\n\n{classes}\n"
            files["torchvision/" + module.replace(".", "/") + "/__init__.py"] = source
    return files


def _import_check(recipe: PeerRecipe) -> str:
    """Python that fails unless torch is the pinned one and every module of the recipe imports."""
    version = TORCH_PIN.split("==")[1]
    return "; ".join(
        [
            "import importlib, torch",
            f"assert torch.__version__.split('+')[0] == {version!r}, torch.__version__",
            *(f"importlib.import_module({module!r})" for module in recipe.imports),
            f"print({recipe.imports[0]!r}, importlib.import_module({recipe.imports[0]!r}).__version__,"
            " 'torch', torch.__version__)",
        ]
    )


def _stamp_for(name: str, recipe: PeerRecipe) -> dict[str, object]:
    stand_in = _stand_in_files() if recipe.torchvision_stand_in else {}
    built_from = json.dumps({"torch": TORCH_PIN, "recipe": asdict(recipe), "stand_in": stand_in}, sort_keys=True)
    return {"peer": name, "digest": hashlib.sha256(built_from.encode()).hexdigest()}


def _run(command: list[str], log: Callable[[str], object], label: str | None = None) -> str:
    """Run one install step, log it (or its label) with its duration, and fail with the tool's own words if it fails."""
    log(label or "$ " + shlex.join(command))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    log(f"  ({time.perf_counter() - started:.1f} s, exit {done.returncode})")
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


def ensure_peer(name: str, log: Callable[[str], object] = print) -> str:
    """Create (if needed) the venv for peer ``name`` and return the path of its python."""
    recipe = RECIPES[name]
    venv = PEERS_ROOT / name
    python = venv / "bin" / "python"
    stamp = _stamp_for(name, recipe)
    stamp_path = venv / STAMP
    if python.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return str(python)
    if venv.exists():
        log(f"{name}: venv at {venv} is stale or incomplete; rebuilding it")
        shutil.rmtree(venv)
    started = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)], log)
    constraints = venv / CONSTRAINTS
    constraints.write_text(TORCH_PIN + "\n")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraints)]
    _run([*pip, TORCH_PIN, *recipe.requirements], log)
    if recipe.no_deps:
        _run([*pip, "--no-deps", TORCH_PIN, *recipe.no_deps], log)
    if recipe.torchvision_stand_in:
        where = [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        site = Path(_run(where, log, f"{name}: finding site-packages").strip())
        for relative, source in _stand_in_files().items():
            (site / relative).parent.mkdir(parents=True, exist_ok=True)
            (site / relative).write_text(source)
        log(f"{name}: wrote a stand-in torchvision into {site}")
    checked = _run([str(python), "-c", _import_check(recipe)], log, f"{name}: importing {', '.join(recipe.imports)}")
    log("  " + checked.strip())
    stamp_path.write_text(json.dumps(stamp) + "\n")
    log(f"{name}: ready in {time.perf_counter() - started:.0f} s: {python}")
    return str(python)


def main(argv: list[str]) -> int:
    names = argv or sorted(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"unknown peer(s) {unknown}; known: {sorted(RECIPES)}", file=sys.stderr)
        return 2
    for name in names:
        print(ensure_peer(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
