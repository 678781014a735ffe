"""What a user installs is what the tests test.

The checks of the installed files need the package imported from a built
wheel: under an editable install (or the bare source tree) they skip, and the
wheel job of ``.ci/run`` sets ``ADEMAMIX_OPTAX_TEST_INSTALLED=1``, which turns
that skip into a failure. The other checks run everywhere.
"""

import ast
import importlib.metadata
import os
import pathlib
import re
import tomllib

from packaging import requirements
from packaging import version
import pytest

import ademamix_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = 'ademamix_optax'
PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
# The dependencies whose oldest allowed versions CI installs.
LOWER_BOUNDED = ('chex', 'flax', 'jax', 'numpy', 'optax', 'orbax-checkpoint')


@pytest.fixture(name='installed', scope='module')
def _installed():
  """The installed distribution's files, if the package is imported from it."""
  try:
    dist = importlib.metadata.distribution(NAME)
  except importlib.metadata.PackageNotFoundError:
    dist = None
  init = pathlib.Path(ademamix_optax.__file__).resolve()
  if dist is not None:
    files = {str(f): f for f in dist.files or ()}
    if init in {
        pathlib.Path(dist.locate_file(f)).resolve() for f in files.values()
    }:
      return dist, files
  reason = (
      f'{NAME} is imported from {init.parent}, not from files an '
      'installed wheel put there (an editable install or the source '
      "tree): .ci/run's wheel job checks the installed files"
  )
  if os.environ.get('ADEMAMIX_OPTAX_TEST_INSTALLED') == '1':
    pytest.fail(reason)
  pytest.skip(reason)


def test_imported_from_site_packages(installed):
  dist, _ = installed
  init = pathlib.Path(ademamix_optax.__file__).resolve()
  assert 'site-packages' in init.parts, init
  assert not init.is_relative_to(ROOT), (init, ROOT)
  assert dist.version == ademamix_optax.__version__


def test_wheel_has_py_typed(installed):
  _, files = installed
  assert f'{NAME}/py.typed' in files
  assert pathlib.Path(files[f'{NAME}/py.typed'].locate()).is_file()


def test_wheel_has_the_license(installed):
  dist, files = installed
  dist_info = f'{NAME}-{dist.version}.dist-info'
  path = f'{dist_info}/licenses/LICENSE'
  assert path in files, sorted(files)
  assert pathlib.Path(files[path].locate()).is_file()
  text = files[path].read_text()
  assert text.split()[:4] == ['Apache', 'License', 'Version', '2.0,']
  assert 'END OF TERMS AND CONDITIONS' in text
  if (ROOT / 'LICENSE').exists():
    assert text == (ROOT / 'LICENSE').read_text()
  assert dist.metadata['License-Expression'] == 'Apache-2.0'
  assert dist.metadata.get_all('License-File') == ['LICENSE']
  # PEP 639: no license classifiers beside the expression.
  classifiers = dist.metadata.get_all('Classifier') or []
  assert not [c for c in classifiers if c.startswith('License ::')]


def test_wheel_has_no_tests_or_examples(installed):
  dist, files = installed
  dist_info = f'{NAME}-{dist.version}.dist-info'
  outside = [f for f in files if f.split('/')[0] not in (NAME, dist_info)]
  assert not outside, outside
  package = [f for f in files if f.startswith(f'{NAME}/')]
  strays = [
      f
      for f in package
      if re.search(r'(^|/)(tests?|examples|benchmarks)/', f[len(NAME) :])
      or re.search(r'(^|/)(test_[^/]*|[^/]*_test|conftest)\.py$', f)
  ]
  assert not strays, strays
  # Nor on disk, listed or not.
  package_dir = pathlib.Path(ademamix_optax.__file__).resolve().parent
  on_disk = [
      str(f.relative_to(package_dir))
      for f in package_dir.rglob('*')
      if f.is_file() and '__pycache__' not in f.parts
  ]
  assert sorted(on_disk) == sorted(
      f[len(NAME) + 1 :] for f in package if '__pycache__' not in f
  )
  # The package itself is there.
  assert f'{NAME}/__init__.py' in files
  assert f'{NAME}/_ademamix.py' in files


def test_version_comes_from_the_package():
  """pyproject.toml takes the version from ``ademamix_optax.__version__``."""
  assert 'version' not in PROJECT
  assert 'version' in PROJECT['dynamic']
  assert re.fullmatch(r'\d+\.\d+\.\d+', ademamix_optax.__version__)
  try:
    installed = importlib.metadata.version(NAME)
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f'{NAME} is not installed')
  assert installed == ademamix_optax.__version__


def test_changelog_has_the_version():
  changelog = (ROOT / 'CHANGELOG.md').read_text()
  headings = re.findall(r'^## \[([^\]]+)\]', changelog, flags=re.M)
  assert headings[0] == 'Unreleased'
  assert ademamix_optax.__version__ in headings


def _pyproject_bounds():
  """{name: oldest allowed version} over the dependencies and the extras."""
  reqs = list(PROJECT['dependencies'])
  for extra in PROJECT['optional-dependencies'].values():
    reqs += extra
  bounds = {}
  for req in map(requirements.Requirement, reqs):
    lower = [s.version for s in req.specifier if s.operator == '>=']
    if req.name in LOWER_BOUNDED:
      assert len(lower) == 1, req
      oldest = version.Version(lower[0])
      # A dependency named twice (test and examples) has one bound.
      assert bounds.setdefault(req.name, oldest) == oldest, req
  return bounds


def _constraints():
  pins = {}
  for line in (ROOT / '.ci' / 'lower-bounds.txt').read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      req = requirements.Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == '==', line
      pins[req.name] = version.Version(spec.version)
  return pins


def test_lower_bounds_file_matches_pyproject():
  """CI installs exactly the oldest versions that pyproject.toml allows."""
  bounds = _pyproject_bounds()
  assert sorted(bounds) == sorted(LOWER_BOUNDED)
  pins = _constraints()
  # jax needs the jaxlib of its own version.
  assert pins.pop('jaxlib') == pins['jax']
  assert pins == bounds


def test_slow_marker_on_example_and_benchmark_tests():
  """The fast set (``-m 'not slow'``) leaves out the smoke runs."""
  smoke = sorted(ROOT.glob('tests/test_example*.py'))
  smoke.append(ROOT / 'tests' / 'test_benchmarks.py')
  assert len(smoke) >= 5
  for path in smoke:
    assert re.search(
        r'^pytestmark = pytest\.mark\.slow$', path.read_text(), flags=re.M
    ), path


def _jax_modules_used(source: str) -> set[str]:
  """The ``jax`` modules a Python source imports or reaches by attribute."""
  used = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      used.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      used.add(node.module)
      used.update(f'{node.module}.{alias.name}' for alias in node.names)
    elif isinstance(node, ast.Attribute):
      used.add(ast.unparse(node))
  return {name for name in used if name.split('.')[0] == 'jax'}


def test_package_uses_only_public_stable_jax_apis():
  """No ``jax.experimental`` or ``jax._src`` in the package (as installed):
  their removal broke the import once (``shard_alike``, jax 0.11.2)."""
  package = pathlib.Path(ademamix_optax.__file__).resolve().parent
  sources = sorted(package.rglob('*.py'))
  assert len(sources) >= 5
  private = re.compile(r'^jax\.(experimental|_src)(\.|$)')
  for path in sources:
    used = _jax_modules_used(path.read_text())
    assert not [u for u in used if private.match(u)], path
  # The check sees what it must refuse.
  assert _jax_modules_used(
      'from jax.experimental.shard_alike import shard_alike\n'
      'import jax\nx = jax._src.core\n'
  ) >= {'jax.experimental.shard_alike', 'jax._src.core'}


def test_classifiers_name_the_tested_pythons():
  """``requires-python``'s lower bound, the one CI's lower-bounds leg runs
  on, is among the classifiers' Python versions."""
  oldest = re.fullmatch(r'>=\s*(\d+\.\d+)', PROJECT['requires-python'])
  assert oldest, PROJECT['requires-python']
  versions = {
      c.rsplit(' :: ', 1)[1]
      for c in PROJECT['classifiers']
      if re.fullmatch(r'Programming Language :: Python :: 3\.\d+', c)
  }
  assert oldest.group(1) in versions
  assert len(versions) >= 2, versions
