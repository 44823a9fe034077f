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
