"""The documentation site: every public name has its page, nothing is fetched.

The site is built once per test session into a temporary folder with
``sphinx-build -W`` (about 10 s), or taken from ``$AMX_DOCS_HTML`` where
``.ci/run`` has built it already. Without the ``docs`` extra (Sphinx, furo,
myst-parser, sphinx-mathjax-offline) the build is skipped, and with it the
tests here and in ``test_docs_browser.py``.
"""

import fcntl
import html.parser
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import typing

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
# The modules whose __all__ the API reference documents (docs/conf.py).
API_MODULES = ('ademamix_optax',)
_DOCS_PACKAGES = ('sphinx', 'furo', 'myst_parser', 'sphinx-mathjax-offline')


def public_names():
  """``(module, name)`` for every name of the API modules that exist."""
  names = []
  for module_name in API_MODULES:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name == module_name:
        continue
      raise
    names.extend((module_name, name) for name in module.__all__)
  return names


def _api_page(module_name, name):
  prefix = module_name[len('ademamix_optax') :].lstrip('.')
  return f'api/{prefix}.{name}.html' if prefix else f'api/{name}.html'


@pytest.fixture(scope='session')
def docs_html(tmp_path_factory):
  """The built HTML site (a folder holding ``index.html``)."""
  prebuilt = os.environ.get('AMX_DOCS_HTML')
  if prebuilt:
    path = pathlib.Path(prebuilt)
    assert (path / 'index.html').is_file(), f'AMX_DOCS_HTML={prebuilt}'
    return path
  missing = [p for p in _DOCS_PACKAGES if importlib.util.find_spec(p) is None]
  if missing:
    pytest.skip(
        f'the docs extra is not installed ({", ".join(missing)} '
        "missing): pip install -e '.[docs]'"
    )
  if os.environ.get('PYTEST_XDIST_WORKER'):
    # The workers of one run share the parent of their temporary folders:
    # the first to get there builds, the others wait for it and read it.
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / 'docs.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      return _build(shared / 'docs')
  return _build(tmp_path_factory.mktemp('docs'))


def _build(folder):
  out, done = folder / 'html', folder / 'built'
  if done.exists():
    return out
  sphinx = [sys.executable, '-m', 'sphinx', '-E', '-W', '--keep-going', '-q']
  proc = subprocess.run(
      [*sphinx, '-b', 'html', '-d', folder / 'doctrees', DOCS, out],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  done.touch()
  return out


class _Tags(html.parser.HTMLParser):
  """Collects the start tags of a page, with their attributes."""

  def __init__(self):
    super().__init__()
    self.tags = []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))


def _tags(path):
  parser = _Tags()
  parser.feed(path.read_text(encoding='utf-8'))
  return parser.tags


def test_every_public_name_has_an_api_page(docs_html):
  names = public_names()
  assert ('ademamix_optax', 'scale_by_ademamix') in names
  index_links = {
      attrs.get('href', '').split('#')[0]
      for tag, attrs in _tags(docs_html / 'api' / 'index.html')
      if tag == 'a'
  }
  for module_name, name in names:
    page = docs_html / _api_page(module_name, name)
    assert page.is_file(), f'{module_name}.{name}: no page {page}'
    ids = {attrs.get('id') for _, attrs in _tags(page)}
    assert (
        f'{module_name}.{name}' in ids
    ), f'{page} does not document {module_name}.{name}'
    assert page.name in index_links, f'the API index does not link {page}'


def test_api_pages_hold_their_math(docs_html):
  text = (docs_html / 'api' / 'scale_by_ademamix.html').read_text()
  # Sphinx writes the TeX of a math block for MathJax to typeset.
  assert '<div class="math' in text
  assert r'\frac{m_1 / (1 - \beta_1^t)' in text
  assert 'Raises' in text and 'Examples' in text


def test_pages_load_nothing_from_the_network(docs_html):
  pages = sorted(docs_html.rglob('*.html'))
  assert len(pages) > 10
  mathjax = []
  for page in pages:
    for tag, attrs in _tags(page):
      for attr in ('src', 'href'):
        url = attrs.get(attr) or ''
        if tag == 'a' or not url:
          continue  # A link is followed by the reader, not loaded.
        assert not url.startswith(
            ('http:', 'https:', '//')
        ), f'{page.relative_to(docs_html)}: <{tag} {attr}="{url}">'
        if tag == 'script' and 'mathjax' in url.lower():
          mathjax.append((page, url))
  # MathJax is there, as a local file, on the pages with math.
  with_mathjax = {p.name for p, _ in mathjax}
  assert with_mathjax >= {'index.html', 'scale_by_ademamix.html'}
  for page, url in mathjax:
    assert (page.parent / url.split('?')[0]).resolve().is_file(), url
  for css in docs_html.rglob('*.css'):
    text = css.read_text(encoding='utf-8', errors='replace')
    assert 'url(http' not in text and '@import "http' not in text, css


def _load_extension():
  spec = importlib.util.spec_from_file_location(
      'amx_docs', DOCS / '_ext' / 'amx_docs.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_docstring_checks_catch_what_is_missing():
  pytest.importorskip(
      'sphinx', reason='needs the docs extra: pip install ' "-e '.[docs]'"
  )
  amx_docs = _load_extension()

  def documented(a, b=1):
    """Does a thing.

    Args:
      a: The first.
      b (int): The second.
    """
    del a, b

  def half_documented(a, b=1, *, c=None):
    """Does a thing.

    Args:
      a: The first; the next line is a continuation, not an argument:
        b is mentioned here.
    """
    del a, b, c

  def undocumented(a):
    del a

  assert not amx_docs.docstring_problems('documented', documented)
  assert amx_docs.docstring_problems('half', half_documented) == [
      'The docstring of half does not document b, c in its Args: section.'
  ]
  assert amx_docs.docstring_problems('none', undocumented) == [
      'none is public (in __all__) but has no docstring.'
  ]
  for module_name, name in public_names():
    obj = getattr(importlib.import_module(module_name), name)
    assert not amx_docs.docstring_problems(name, obj), name

  class Bare(typing.NamedTuple):
    x: int

  class Partial(typing.NamedTuple):
    """A state.

    Attributes:
      x: Documented.
    """

    x: int
    y: int

  assert amx_docs.docstring_problems('Bare', Bare) == [
      'Bare is public (in __all__) but has no docstring.'
  ]
  assert amx_docs.docstring_problems('Partial', Partial) == [
      (
          'The docstring of Partial does not document y in its Attributes: '
          'section.'
      )
  ]


def test_readme_says_how_to_build_the_site():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('\n## Documentation\n', 1)[1].split('\n## ', 1)[0]
  command = re.findall(r'```bash\n(.*?)```', section, flags=re.DOTALL)[0]
  assert "pip install -e '.[docs]'" in command
  assert 'sphinx-build -W --keep-going -b html docs docs/_build/html' in command
  assert '`docs/_build/html/index.html`' in section
  # The README's first two commands stay the first two bash blocks.
  assert readme.index('## Documentation') > readme.index('```bash\npython3')
