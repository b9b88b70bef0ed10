"""attnc: a compiler for attention variants written as cascades of Einsums.

Installed, the subpackages (``attnc.einsum_ir``, ``attnc.frontends``, …) come from
the top-level folders of the source tree through setuptools' ``package-dir``.  When
Python runs inside a checkout, this folder shadows the installed package, so the
checkout's root joins the package path and the same subpackages are found there.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "einsum_ir" / "__init__.py").is_file() and not (
        _Path(__file__).resolve().parent / "einsum_ir").exists():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own __path__

# The Python API, imported on first use so that ``import attnc`` stays cheap (no sympy,
# lark or jinja until a spec is compiled): attnc.compile, attnc.load, attnc.SpecError.
_API = {"compile": "frontends.api", "load": "frontends.api", "CompileOptions": "frontends.api",
        "CompiledModule": "frontends.api", "cache_dir": "frontends.api",
        "SpecError": "frontends.api", "SpecWarning": "frontends.api",
        # partial states, their derived merge, ring attention over torch.distributed
        "compile_context_parallel": "backends.context_parallel"}


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        value = getattr(import_module(f"{__name__}.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
