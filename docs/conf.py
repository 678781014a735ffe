"""Sphinx configuration of the ademamix_optax documentation.

Build (from the repository root, after ``pip install -e '.[docs]'``)::

  sphinx-build -W --keep-going -b html docs docs/_build/html
  sphinx-build -W --keep-going -b doctest docs docs/_build/doctest
"""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS / '_ext'))

# After the sys.path entries above.
import amx_docs  # noqa: E402  # pylint: disable=g-import-not-at-top

import ademamix_optax  # noqa: E402  # pylint: disable=g-import-not-at-top

project = 'ademamix_optax'
author = 'ademamix_optax developers'
copyright = 'ademamix_optax developers'  # pylint: disable=redefined-builtin
release = version = ademamix_optax.__version__

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.doctest',
    'myst_parser',
    'amx_docs',
]

# The API pages: every name of each module's __all__ (docs/_ext/amx_docs.py).
# A module that does not exist yet is skipped.
amx_api_modules = ['ademamix_optax']
# Markdown files of the repository shown as they are, each at its own path
# under docs/ (so that the links between them, and from the README, work).
amx_mirrored_folders = ['examples', 'benchmarks']
amx_mirrored_files = [
    'examples/README.md',
    'examples/lm/README.md',
    'benchmarks/README.md',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build', '_ext', 'Thumbs.db', '.DS_Store']

# Every cross-reference must resolve. Without network there is no
# intersphinx: names of other libraries are shown as code, not links.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(optax|jax|jaxlib|numpy|np|flax|chex|typing)(\..*)?'),
    (r'py:.*', r'(int|float|bool|str|None|Any|Callable|Optional|Union)'),
    (r'py:.*', r'(collections\.abc|typing_extensions)\..*'),
    # Private modules' types in the signatures of public functions.
    (r'py:.*', r'ademamix_optax\._.*'),
]

# Google-style docstrings; Attributes of a state become attribute entries.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
# Signatures show jax.typing.ArrayLike, optax.ScalarOrSchedule, ... as written,
# not the unions they stand for.
autodoc_type_aliases = amx_docs.type_aliases(amx_api_modules)
autodoc_preserve_defaults = True
add_module_names = False
python_display_short_literal_types = True

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3

# MathJax 3 from the sphinx-mathjax-offline package, copied into _static by
# amx_docs: no CDN. SVG output needs no font files, so math renders from a
# page opened as a local file too.
mathjax_path = 'mathjax/tex-svg.js'
mathjax3_config = {'svg': {'fontCache': 'global'}}

# Doctests: the ``{testcode}`` blocks of the pages and the ``>>>`` examples of
# the docstrings, run by ``sphinx-build -b doctest``.
doctest_test_doctest_blocks = 'default'

html_theme = 'furo'
html_title = f'ademamix_optax {release}'
html_static_path = []
html_show_sourcelink = False
html_copy_source = False
