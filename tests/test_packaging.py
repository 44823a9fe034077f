"""passes/ and kernels/ are installed as fxdisagg.passes / fxdisagg.kernels; no module of
them may be loaded twice under two names (registering an op twice crashes)."""

import pathlib
import subprocess
import sys

import fxdisagg


def test_no_module_loaded_twice():
    code = ("import sys, fxdisagg, fxdisagg.api, fxdisagg.kernels.torch_cpu, fxdisagg.kernels.reference;"
            "files = {}\n"
            "for name, m in list(sys.modules.items()):\n"
            "    f = getattr(m, '__file__', None)\n"
            "    if f and ('/passes/' in f or '/kernels/' in f) and 'site-packages' not in f:\n"
            "        assert f not in files, (name, files.get(f)); files[f] = name\n"
            "assert all(n.startswith('fxdisagg.') for n in files.values()), files\n"
            "print(len(files))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=pathlib.Path(fxdisagg.__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 8


def test_no_bare_imports_of_passes_or_kernels():
    root = pathlib.Path(fxdisagg.__file__).parents[1]
    for py in root.glob("*/**/*.py"):
        if ".venv" in py.parts:
            continue
        for line in py.read_text().splitlines():
            s = line.strip()
            assert not s.startswith(("import passes", "from passes", "import kernels",
                                     "from kernels")), f"{py}: {s}"


def test_top_level_kernels_is_not_shadowed_from_the_repository_root():
    """From the repository root `kernels/` is also a top-level package; the name belongs to
    HF's `kernels` (which transformers >= 5.25 imports on start), and it must get it."""
    import importlib.metadata
    try:
        importlib.metadata.distribution("kernels")
        hf_kernels = True
    except importlib.metadata.PackageNotFoundError:
        hf_kernels = False
    code = ("import kernels, transformers, fxdisagg.kernels as ours;"
            "from transformers import LlamaForCausalLM;"
            "print(kernels.__file__, ours.partial_attention.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=pathlib.Path(fxdisagg.__file__).parents[1])
    if hf_kernels:
        assert out.returncode == 0, out.stderr
        path, module = out.stdout.split()
        assert "site-packages" in path and module == "fxdisagg.kernels.api"
    else:
        assert "fxdisagg's kernels are fxdisagg.kernels" in out.stderr
