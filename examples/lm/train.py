"""Trains the byte-level language model with AdamW and with AdEMAMix.

The library entry point is :func:`train_and_evaluate`. Both optimizers start
from the same initial parameters and see the same batches in the same order
under the same learning-rate schedule, so the curves differ only by the
optimizer. Each optimizer's run is checkpointed on its own and can be resumed
exactly: batch ``i`` is a pure function of ``(seed, i)``, so the step is the
whole data-loader state.

Parallelism: a 2-D device mesh with axes ``data`` (the batch is split over
it) and ``model`` (each parameter, and the optimizer state with it, is split
over it along its largest divisible dimension, FSDP style). The mesh axes are
``Auto``: the state and the batch carry ``NamedSharding`` annotations and XLA
inserts the gathers and reductions; the train step pins the new state back to
the same shardings so they never drift.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Optional, TextIO

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

import ademamix_optax as amx
from examples._shared import cli
from examples._shared import corpus as corpus_lib
from examples._shared import report as shared_report
from examples.lm import configs
from examples.lm import model as model_lib
from examples.lm import report

# Config fields that may differ between a run and its resumption.
_RESUMABLE_CHANGES = frozenset(
    {'optimizers', 'log_every', 'checkpoint_every', 'mesh_data', 'mesh_model'}
)


# ----------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(config: configs.Config) -> Mesh:
  """The ``(data, model)`` mesh over all devices, with ``Auto`` axes."""
  n = jax.device_count()
  model_size = config.mesh_model
  data_size = n // model_size if config.mesh_data == -1 else config.mesh_data
  if data_size * model_size != n:
    raise cli.UsageError(
        f'Mesh data={data_size} x model={model_size} does not cover the {n} '
        'devices.'
    )
  if config.batch % data_size:
    raise cli.UsageError(
        f'batch={config.batch} is not divisible by the data axis '
        f'({data_size}).'
    )
  return jax.make_mesh(
      (data_size, model_size),
      ('data', 'model'),
      axis_types=(AxisType.Auto, AxisType.Auto),
  )


def fsdp_spec(shape: tuple[int, ...], model_size: int) -> P:
  """Splits the largest dimension divisible by ``model_size``; else none.

  Optimizer moments have their parameter's shape, so the same rule applied to
  the whole (model, optimizer) state shards each moment like its parameter.
  """
  if model_size == 1:
    return P()
  divisible = [i for i, d in enumerate(shape) if d % model_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: shape[i])
  return P(*('model' if i == axis else None for i in range(len(shape))))


def spec_entries(spec: P, ndim: int) -> list[Any]:
  """A partition spec as one entry per dimension (``P('a')`` is ``P('a',
  None)`` for a matrix), for comparing specs."""
  return list(spec) + [None] * (ndim - len(spec))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """A tree of ``NamedSharding`` like ``abstract_state``."""
  model_size = mesh.shape['model']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, model_size)),
      abstract_state,
  )


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from host data that every process holds in full."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ----------------------------------------------------------------------------
# Optimizers.


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return tuple(names)


def decay_mask(params: Any) -> Any:
  """``True`` for the dense-layer kernels, the only weights that decay.

  Biases, LayerNorm scales and offsets, and the (tied) token and positional
  embeddings are left alone, as in the paper's GPT-2 codebase.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'kernel' in _path_names(path), params
  )


def learning_rate_schedule(
    config: configs.Config, name: configs.Optimizer
) -> optax.Schedule:
  """Linear warmup from 0 to ``name``'s peak learning rate, then cosine
  decay to ``end_lr_ratio`` times it."""
  peak = config.peak_lr(name)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=config.warmup_steps,
      decay_steps=config.steps,
      end_value=peak * config.end_lr_ratio,
  )


def _state_dtype_kwargs(config: configs.Config, fn: Callable) -> dict:
  if config.state_format is not None and fn is not optax.adamw:
    return {'state_format': config.state_format}
  if config.state_dtype == 'float32':
    return {}
  dtype, _, rounding = config.state_dtype.partition('-')
  kwargs = {'mu_dtype': jnp.dtype(dtype)}
  parameters = inspect.signature(fn).parameters
  if 'nu_dtype' in parameters:
    kwargs['nu_dtype'] = jnp.dtype(dtype)
  if 'stochastic_rounding' in parameters:
    kwargs['stochastic_rounding'] = rounding != 'nearest'
  return kwargs


def make_optimizer(
    name: str, config: configs.Config
) -> optax.GradientTransformation:
  """Gradient clipping, then AdamW or AdEMAMix with masked weight decay."""
  lr = learning_rate_schedule(config, name)
  if name == 'adamw':
    tx = optax.adamw(
        lr,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        mask=decay_mask,
        **_state_dtype_kwargs(config, optax.adamw),
    )
  elif name == 'ademamix':
    tx = amx.ademamix(
        lr,
        b1=config.b1,
        b2=config.b2,
        b3=config.resolved_b3,
        alpha=config.alpha,
        weight_decay=config.weight_decay,
        mask=decay_mask,
        t_alpha_beta3=config.steps,
        **_state_dtype_kwargs(config, amx.ademamix),
    )
  elif name == 'simplified_ademamix':
    # The authors' recipe: b1 warms up from AdamW's b1, and the learning
    # rate is AdamW's times sqrt((1 - b1_start) (1 - b1)).
    scale = math.sqrt((1 - config.b1) * (1 - config.simplified_b1))
    tx = amx.simplified_ademamix(
        lambda count: scale * lr(count),
        b1=config.simplified_b1,
        b2=config.b2,
        alpha=config.simplified_alpha,
        weight_decay=config.weight_decay / scale,
        mask=decay_mask,
        t_b1=config.steps,
        b1_start=config.b1,
        **_state_dtype_kwargs(config, amx.simplified_ademamix),
    )
  else:
    raise ValueError(f'Unknown optimizer {name!r}.')
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)


def logged_schedules(name: str, config: configs.Config) -> dict[str, list]:
  """The hyperparameters used at steps 1..steps, from the schedules.

  Optax evaluates the learning rate at the 0-based count and the AdEMAMix
  warmups at the 1-based step; entry ``i`` here is what step ``i + 1`` used.
  """
  count = jnp.arange(config.steps)
  out = {'lr': learning_rate_schedule(config, name)(count)}
  if name == 'ademamix':
    out['alpha'] = amx.alpha_warmup(config.alpha, config.steps)(count + 1)
    out['b3'] = amx.beta3_warmup(
        config.resolved_b3, config.steps, b_start=config.b1
    )(count + 1)
  return {k: [float(f'{v:.7g}') for v in np.asarray(a)] for k, a in out.items()}


# ----------------------------------------------------------------------------
# Model and optimizer state.


# Config fields that do not enter the model, the optimizer or the train step.
_NOT_COMPILED = (
    'data',
    'max_bytes',
    'val_fraction',
    'batch',
    'optimizers',
    'eval_every',
    'eval_batches',
    'log_every',
    'checkpoint_every',
    'mesh_data',
    'mesh_model',
)


@dataclasses.dataclass(frozen=True)
class Program:
  """One optimizer's training program: built (and compiled) once per setting.

  Attributes:
    tx: The optax transformation.
    graphdef: The static structure of the (model, optimizer) pair.
    abstract_state: Their state as ShapeDtypeStructs with shardings: the
      target to restore checkpoints against.
    shardings: Their state's layout on the mesh, a tree of NamedSharding.
    init: Returns a freshly initialised state, laid out on the mesh.
    train_step: ``train_step(model, optimizer, seq_BxL1) -> loss``.
  """

  tx: optax.GradientTransformation
  graphdef: Any
  abstract_state: Any
  shardings: Any
  init: Callable[[], Any]
  train_step: Callable[..., jax.Array]


def make_program(name: str, config: configs.Config, mesh: Mesh) -> Program:
  """The cached :class:`Program` of optimizer ``name`` under ``config``.

  Runs that differ only in fields outside the model and optimizer (the
  data, the batch size, logging, the checkpoint schedule) share a program,
  so repeated calls in one process (tests, notebooks) compile once.
  """
  key = dataclasses.replace(
      config, **{f: getattr(configs.DEFAULT, f) for f in _NOT_COMPILED}
  )
  return _make_program(name, key, mesh)


@functools.lru_cache(maxsize=8)
def _make_program(name: str, config: configs.Config, mesh: Mesh) -> Program:
  tx = make_optimizer(name, config)

  def create() -> tuple[model_lib.TransformerLM, nnx.Optimizer]:
    model = model_lib.TransformerLM(
        d_model=config.d_model,
        layers=config.layers,
        heads=config.heads,
        context=config.context,
        mlp_ratio=config.mlp_ratio,
        rngs=nnx.Rngs(config.seed),
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  # The layout comes from an abstract evaluation: no unsharded copy of the
  # parameters or of the optimizer state is ever made.
  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = state_shardings(abstract, mesh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract,
      shardings,
  )
  init = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)

  @nnx.jit
  def train_step(
      model: model_lib.TransformerLM,
      optimizer: nnx.Optimizer,
      seq_BxL1: jax.Array,
  ) -> jax.Array:
    def loss_fn(model):
      loss = model_lib.next_byte_loss(model, seq_BxL1)
      return loss, None

    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    # Keep the new parameters and moments in the layout they came in.
    state = nnx.state((model, optimizer))
    nnx.update(
        (model, optimizer), jax.lax.with_sharding_constraint(state, shardings)
    )
    return loss

  return Program(tx, graphdef, abstract, shardings, init, train_step)


@nnx.jit
def eval_step(
    model: model_lib.TransformerLM, seqs_ExBxL1: jax.Array
) -> jax.Array:
  """Mean loss over ``E`` validation batches, one compiled call."""
  losses_E = jax.lax.map(
      lambda seq_BxL1: model_lib.next_byte_loss(model, seq_BxL1), seqs_ExBxL1
  )
  return losses_E.mean()


# ----------------------------------------------------------------------------
# One optimizer's run.


def _say(out: TextIO, text: str) -> None:
  """Writes a line on process 0 only."""
  if jax.process_index() == 0:
    out.write(text + '\n')
    out.flush()


def check_finite(name: str, steps: list[int], losses: np.ndarray) -> None:
  """Raises ``FloatingPointError`` at the first NaN or infinite loss."""
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    i = int(bad[0])
    raise FloatingPointError(
        f'{name}: the loss is {losses[i]} at step {steps[i]}; stopping '
        'instead of training on garbage.'
    )


def _new_history() -> dict[str, Any]:
  return {
      'step': [],
      'train_loss': [],
      'eval_step': [],
      'val_loss': [],
      'wall_time_s': 0.0,
  }


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=2, enable_async_checkpointing=True
      ),
  )


def _check_config(saved: dict[str, Any], config: configs.Config) -> None:
  current = json.loads(json.dumps(dataclasses.asdict(config)))
  diff = sorted(
      k
      for k in set(saved) | set(current)
      if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k)
  )
  if diff:
    changes = ', '.join(
        f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in diff
    )
    raise cli.UsageError(
        f'Cannot resume: the config changed ({changes}). Use another '
        'workdir, or drop --resume to start over.'
    )


def _restore_or_init(
    program: Program,
    manager: ocp.CheckpointManager,
    config: configs.Config,
    resume: bool,
    say: Callable[[str], None],
) -> tuple[model_lib.TransformerLM, nnx.Optimizer, int, dict[str, Any]]:
  """The latest checkpoint when resuming and there is one; else a new init.

  Returns:
    The model, the optimizer, the number of steps done and the history.
  """
  latest = manager.latest_step() if resume else None
  if latest is None:
    if resume:
      say(
          f'--resume: no checkpoint found in {manager.directory}; training '
          'starts from step 0.'
      )
    model, optimizer = nnx.merge(program.graphdef, program.init())
    return model, optimizer, 0, _new_history()
  meta = manager.restore(
      latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
  )['meta']
  _check_config(meta['config'], config)
  # Restored straight into the mesh layout of the abstract target.
  arrays = manager.restore(
      latest,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(program.abstract_state)
      ),
  )['state']
  model, optimizer = nnx.merge(program.graphdef, arrays)
  step = meta['step']
  if meta['data_position'] != step or int(optimizer.step[...]) != step:
    raise ValueError(
        f'Checkpoint {latest} is inconsistent: step {step}, data position '
        f"{meta['data_position']}, optimizer step {int(optimizer.step[...])}."
    )
  return model, optimizer, step, meta['history']


def train_one(
    name: str,
    config: configs.Config,
    workdir: pathlib.Path,
    corpus: corpus_lib.Corpus,
    mesh: Mesh,
    *,
    resume: bool,
    stop_after: Optional[int],
    out: TextIO,
) -> dict[str, Any]:
  """Trains (or resumes) one optimizer; returns its history and state.

  Returns:
    A dict with ``history`` (per-step train loss, evaluated validation loss,
    wall time over all sessions), ``wall_time_s`` (this session),
    ``steps_per_s`` (this session, compilation and evaluation excluded),
    ``step`` (steps done), ``params`` (the final parameters as NumPy
    arrays; ``None`` on several hosts) and ``specs`` (the partition spec of
    every model and optimizer array at the end, by path, as
    :func:`spec_entries`).
  """
  is_main = jax.process_index() == 0
  start_time = time.perf_counter()
  program = make_program(name, config, mesh)
  ckpt_dir = workdir / 'checkpoints' / name
  if not resume:
    if ckpt_dir.exists() and is_main:
      shutil.rmtree(ckpt_dir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'fresh checkpoints {name}')
  manager = _checkpoint_manager(ckpt_dir)
  try:
    model, optimizer, step, history = _restore_or_init(
        program, manager, config, resume, functools.partial(_say, out)
    )
    wall_before = history['wall_time_s']

    def save(at_step: int) -> None:
      history['wall_time_s'] = wall_before + time.perf_counter() - start_time
      # Snapshots: the save finishes in the background while training goes
      # on, and nnx.state() shares the model's Variable objects.
      state = jax.tree.map(lambda x: x, nnx.state((model, optimizer)))
      meta = json.loads(
          json.dumps(
              {
                  'step': at_step,
                  'data_position': at_step,  # Index of the next training batch.
                  'history': history,
                  'config': dataclasses.asdict(config),
              }
          )
      )
      manager.save(
          at_step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
          ),
          force=True,
      )

    batch_sharding = NamedSharding(mesh, P('data', None))
    val_ExBxL1 = put_global(
        corpus_lib.val_batches(
            corpus.val_U8, config.eval_batches, config.batch, config.context
        ),
        NamedSharding(mesh, P(None, 'data', None)),
    )

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    progress = cli.progress(
        config.steps, name, out=out, initial=step, disable=not is_main
    )
    pending: list[tuple[int, jax.Array]] = []
    last_val = history['val_loss'][-1] if history['val_loss'] else None
    step_time, timed_steps = 0.0, 0

    def flush_losses() -> None:
      """Moves pending losses to the history; raises on a non-finite one."""
      if not pending:
        return
      steps = [s for s, _ in pending]
      losses = np.asarray(jax.device_get([loss for _, loss in pending]))
      check_finite(name, steps, losses)
      history['step'].extend(steps)
      history['train_loss'].extend(float(loss) for loss in losses)
      pending.clear()

    with jax.set_mesh(mesh):
      first_step = step
      while step < end:
        t0 = time.perf_counter()
        seq_BxL1 = put_global(
            corpus_lib.train_batch(
                corpus.train_U8, config.seed, step, config.batch, config.context
            ),
            batch_sharding,
        )
        loss = program.train_step(model, optimizer, seq_BxL1)
        step += 1
        pending.append((step, loss))
        log_now = step % config.log_every == 0 or step == end
        eval_now = step % config.eval_every == 0 or step == config.steps
        if step == first_step + 1 or log_now or eval_now:
          flush_losses()  # Synchronises: the timings below are real.
        if step > first_step + 1:  # The first step of a session compiles.
          step_time += time.perf_counter() - t0
          timed_steps += 1
        if eval_now:
          last_val = float(eval_step(model, val_ExBxL1))
          check_finite(f'{name} (validation)', [step], np.array([last_val]))
          history['eval_step'].append(step)
          history['val_loss'].append(last_val)
        if log_now or eval_now:
          progress.set_postfix(
              loss=f"{history['train_loss'][-1]:.3f}",
              val='-' if last_val is None else f'{last_val:.3f}',
              refresh=False,
          )
          progress.update(step - progress.n)
        if step % config.checkpoint_every == 0 or step == end:
          save(step)
    flush_losses()
    progress.close()
  finally:
    manager.wait_until_finished()
    manager.close()
  history['wall_time_s'] = wall_before + time.perf_counter() - start_time

  specs = {}
  for prefix, node in (('model', model), ('optimizer', optimizer)):
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(node)):
      specs[prefix + jax.tree_util.keystr(path)] = spec_entries(
          x.sharding.spec, x.ndim
      )
  params = None
  if jax.process_count() == 1:
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {
      'history': history,
      'step': step,
      'wall_time_s': time.perf_counter() - start_time,
      'steps_per_s': timed_steps / step_time if step_time > 0 else None,
      'params': params,
      'specs': specs,
  }


# ----------------------------------------------------------------------------
# Both optimizers.


def train_and_evaluate(
    config: configs.Config,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
  """Trains each optimizer in ``config.optimizers`` and reports.

  Writes to ``workdir``: ``checkpoints/<optimizer>/`` (orbax), and once every
  optimizer has reached ``config.steps``: ``curves.json``, ``loss_curves.png``
  and ``results.md`` (the printed table).

  Args:
    config: The run's settings.
    workdir: Output directory, created if needed.
    resume: Continue each optimizer from its latest checkpoint, if any;
      without it, old checkpoints of the optimizers trained are deleted.
    stop_after: Stop each optimizer after this many steps in all (a
      checkpoint is saved there), as if interrupted; ``--resume`` continues.
    out: Where the progress and the results go.

  Returns:
    A dict with ``runs`` (per optimizer: see :func:`train_one`),
    ``summary`` (the numbers of the table) and ``corpus`` (its description).
  """
  total_start = time.perf_counter()
  is_main = jax.process_index() == 0
  workdir = pathlib.Path(workdir)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(config)

  t0 = time.perf_counter()
  corpus = corpus_lib.load_corpus(
      config.data, config.max_bytes, config.val_fraction
  )
  corpus_lib.check_length(
      corpus, config.context, config.eval_batches * config.batch
  )
  load_time = time.perf_counter() - t0

  say = functools.partial(_say, out)

  files = (
      f' ({corpus.num_train_files} / {corpus.num_val_files} files)'
      if corpus.num_train_files
      else ''
  )
  say(
      f'Data: {corpus.source}\n'
      f'  train {len(corpus.train_U8):,} bytes, validation '
      f'{len(corpus.val_U8):,} bytes{files}, loaded in {load_time:.1f}s'
  )
  say(
      f'Mesh: {dict(mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s)'
  )
  say(
      f'Model: d_model={config.d_model} layers={config.layers} '
      f'heads={config.heads} context={config.context}; '
      f'{config.steps} steps of {config.batch} x {config.context} bytes, '
      'peak lr '
      + ', '.join(
          f'{report.label(n)} {config.peak_lr(n):g}' for n in config.optimizers
      )
      + f'; AdEMAMix b3={config.resolved_b3:g} '
      f'alpha={config.alpha:g} T_alpha_beta3={config.steps}'
  )

  runs = {}
  for name in config.optimizers:
    runs[name] = train_one(
        name,
        config,
        workdir,
        corpus,
        mesh,
        resume=resume,
        stop_after=stop_after,
        out=out,
    )
    if is_main and runs[name]['params'] is not None:
      n_params = sum(x.size for x in jax.tree.leaves(runs[name]['params']))
      runs[name]['num_params'] = int(n_params)

  summary = report.summarize(config, runs)
  finished = all(run['step'] == config.steps for run in runs.values())
  if is_main:
    say('')
    table = report.results_table(config, summary)
    say(table)
    if finished:
      curves = {
          name: {**run['history'], **logged_schedules(name, config)}
          for name, run in runs.items()
      }
      shared_report.write_json(
          workdir / 'curves.json',
          report.curves_payload(config, corpus, summary, curves),
      )
      report.plot_curves(workdir / 'loss_curves.png', config, curves)
      (workdir / 'results.md').write_text(table + '\n')
      say(
          f'\nWrote {workdir}/curves.json, loss_curves.png, results.md; '
          f'total time {time.perf_counter() - total_start:.0f}s.'
      )
    else:
      say(f'\nStopped before step {config.steps}; continue with --resume.')
  return {'runs': runs, 'summary': summary, 'corpus': corpus.source}
