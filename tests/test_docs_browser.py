"""The built site in a real browser: math typeset, no console error, offline.

Headless Chromium (Debian's ``chromium`` package) opens the start page and the
``scale_by_ademamix`` API page as local files, driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``: no port, no Python package).
Each page must typeset every math element with the local MathJax, leave no
TeX source in the text, log no console error or exception, and request
nothing but local files. Skipped only where Chromium is not installed.
"""

# pytest fixtures are parameters named like the fixture functions.
# pylint: disable=redefined-outer-name

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

# The session's built site (one build shared with test_docs.py).
from test_docs import docs_html  # noqa: F401  # pylint: disable=unused-import

_FLAGS = (
    *(
        '--headless --no-sandbox --disable-gpu --disable-quic --no-first-run '
        '--disable-background-networking --disable-component-update '
        '--disable-sync --disable-dev-shm-usage --remote-debugging-pipe'
    ).split(),
    # Hermetic: no name resolves and every http(s) request goes to a closed
    # loopback port, so a page that wants the network fails instead.
    '--host-resolver-rules=MAP * ~NOTFOUND',
    '--proxy-server=127.0.0.1:9',
)
_PAGES = ('index.html', 'api/scale_by_ademamix.html')


def _chromium():
  for name in (os.environ.get('AMX_CHROMIUM'), 'chromium', 'chromium-browser'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


class _Browser:
  """A minimal DevTools-protocol client over Chromium's pipe (fds 3, 4)."""

  def __init__(self, executable, user_data_dir):
    to_browser_r, self._to_browser = os.pipe()
    self._from_browser, from_browser_w = os.pipe()
    # The protocol runs on the browser's fds 3 (in) and 4 (out), where bash
    # moves the pipes (dash cannot name fds above 9). A preexec_fn would fork
    # through Python's fork hooks, whose JAX warning is an error here.
    plumb = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
    self._proc = subprocess.Popen(
        [
            shutil.which('bash') or '/bin/bash',
            '-c',
            plumb,
            'bash',
            executable,
            *_FLAGS,
            f'--user-data-dir={user_data_dir}',
            'about:blank',
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(to_browser_r, from_browser_w),
        start_new_session=True,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    self._buffer = b''
    self._next_id = 0
    self.events = []

  def close(self):
    """Closes the browser, and kills its process group if it lingers."""
    try:
      try:
        self.call('Browser.close', timeout=5.0)
        self._proc.wait(timeout=10)
      except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
        pass
      if self._proc.poll() is None:
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
    finally:
      os.close(self._to_browser)
      os.close(self._from_browser)

  def _receive(self, deadline):
    while b'\0' not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError('no answer from Chromium')
      ready, _, _ = select.select([self._from_browser], [], [], left)
      if ready:
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
          raise RuntimeError(f'Chromium exited ({self._proc.poll()})')
        self._buffer += chunk
    message, self._buffer = self._buffer.split(b'\0', 1)
    return json.loads(message)

  def call(self, method, session=None, timeout=30.0, **params):
    self._next_id += 1
    message = {'id': self._next_id, 'method': method, 'params': params}
    if session:
      message['sessionId'] = session
    os.write(self._to_browser, json.dumps(message).encode() + b'\0')
    deadline = time.monotonic() + timeout
    while True:
      reply = self._receive(deadline)
      if reply.get('id') == self._next_id:
        if 'error' in reply:
          raise RuntimeError(f'{method}: {reply["error"]}')
        return reply['result']
      self.events.append(reply)

  def wait_for(self, method, session, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
      for event in self.events:
        if event.get('method') == method and event.get('sessionId') == session:
          return event
      self.events.append(self._receive(deadline))


# Waits for MathJax's first typesetting, then reports on the page.
_INSPECT = r"""
(async () => {
  const deadline = Date.now() + 30000;
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    if (Date.now() > deadline) return {error: 'MathJax never started'};
    await new Promise(resolve => setTimeout(resolve, 50));
  }
  await MathJax.startup.promise;
  const math = [...document.querySelectorAll('.math')];
  return {
    version: MathJax.version,
    math: math.length,
    typeset: math.filter(e => e.querySelector('mjx-container svg')).length,
    containers: document.querySelectorAll('mjx-container').length,
    errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
    text: document.body.innerText,
  };
})()
"""


def _open(browser, url):
  target = browser.call('Target.createTarget', url='about:blank')['targetId']
  session = browser.call(
      'Target.attachToTarget', targetId=target, flatten=True
  )['sessionId']
  for domain in ('Page', 'Runtime', 'Log', 'Network'):
    browser.call(f'{domain}.enable', session=session)
  browser.call('Page.navigate', session=session, url=url)
  browser.wait_for('Page.loadEventFired', session)
  report = browser.call(
      'Runtime.evaluate',
      session=session,
      expression=_INSPECT,
      awaitPromise=True,
      returnByValue=True,
      timeout=45.0,
  )
  if 'exceptionDetails' in report:
    raise AssertionError(report['exceptionDetails'])
  # Let late console messages arrive.
  browser.call(
      'Runtime.evaluate',
      session=session,
      expression='new Promise(r => setTimeout(r, 300))',
      awaitPromise=True,
  )
  problems, requests = [], []
  for event in browser.events:
    if event.get('sessionId') != session:
      continue
    method, params = event.get('method'), event.get('params', {})
    if method == 'Runtime.consoleAPICalled' and params['type'] in (
        'error',
        'assert',
    ):
      problems.append(
          ' '.join(
              str(a.get('value', a.get('description'))) for a in params['args']
          )
      )
    elif method == 'Runtime.exceptionThrown':
      problems.append(json.dumps(params['exceptionDetails'])[:500])
    elif method == 'Log.entryAdded' and params['entry']['level'] == 'error':
      problems.append(params['entry'].get('text', ''))
    elif method == 'Network.requestWillBeSent':
      requests.append(params['request']['url'])
  return report['result']['value'], problems, requests


@pytest.fixture(scope='module')
def pages(docs_html):  # noqa: F811
  executable = _chromium()
  if executable is None:
    pytest.skip(
        'Chromium is not installed (apt-get install chromium; '
        '.ci/run installs it where it can)'
    )
  results = {}
  with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
    browser = _Browser(executable, profile)
    try:
      for page in _PAGES:
        results[page] = _open(browser, (docs_html / page).as_uri())
    finally:
      browser.close()
  return results


@pytest.mark.parametrize('page', _PAGES)
def test_math_is_typeset(pages, page):
  report, _, _ = pages[page]
  assert 'error' not in report, report
  assert report['version'].startswith('3.'), report['version']
  assert report['math'] >= 3
  assert report['typeset'] == report['math']
  assert report['containers'] >= report['math']
  assert report['errors'] == 0
  for tex in (r'\frac', r'\begin', r'\beta', r'\(', r'\['):
    assert tex not in report['text'], tex


@pytest.mark.parametrize('page', _PAGES)
def test_no_console_errors(pages, page):
  _, problems, _ = pages[page]
  assert not problems


@pytest.mark.parametrize('page', _PAGES)
def test_only_local_files_are_loaded(pages, page):
  _, _, requests = pages[page]
  assert any('/_static/mathjax/tex-svg.js' in url for url in requests)
  remote = [
      url
      for url in requests
      if not url.startswith(('file://', 'data:', 'about:'))
  ]
  assert not remote
