"""Trains the byte-level language model with AdamW and with AdEMAMix.

:func:`train_and_evaluate` is the library entry point. Every optimizer starts
from the same parameters and sees the same batches under the same schedule
shape, so the curves differ by the optimizer alone. Each optimizer's run is
checkpointed on its own and resumes bit for bit: batch ``i`` is a pure
function of ``(seed, i)``, so the step is the whole data-loader state.

Parallelism: a ``(data, model)`` mesh with ``Auto`` axes. The batch is split
over ``data``; each parameter, and its optimizer moments with it, over
``model`` along its largest divisible dimension (FSDP style). XLA inserts the
collectives; the train step pins the new state to the old layout.
"""

from __future__ import annotations

import dataclasses
import functools
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

# Config fields that enter neither the model, the optimizer nor the train
# step: runs that differ only in them share one compiled program.
_NOT_COMPILED = (
    'data max_bytes val_fraction batch optimizers eval_every eval_batches '
    'log_every checkpoint_every mesh_data mesh_model'
).split()
# Config fields that may change when a run is resumed.
_RESUMABLE = 'optimizers log_every checkpoint_every mesh_data mesh_model'


def make_mesh(config: configs.Config) -> jax.sharding.Mesh:
  """The ``(data, model)`` mesh over all devices, with ``Auto`` axes."""
  n, model = jax.device_count(), config.mesh_model
  data = n // model if config.mesh_data == -1 else config.mesh_data
  if data * model != n:
    raise cli.UsageError(
        f'Mesh data={data} x model={model} does not cover the {n} devices.'
    )
  if config.batch % data:
    raise cli.UsageError(
        f'batch={config.batch} is not divisible by the data axis ({data}).'
    )
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), ('data', 'model'), auto)


def fsdp_spec(shape: tuple[int, ...], model_size: int) -> P:
  """Splits the largest dimension divisible by ``model_size``, if any (an
  optimizer moment has its parameter's shape, so is split like it)."""
  divisible = [i for i, d in enumerate(shape) if d % model_size == 0]
  if model_size == 1 or not divisible:
    return P()
  axis = max(divisible, key=lambda i: shape[i])
  return P(*('model' if i == axis else None for i in range(len(shape))))


def spec_entries(spec: P, ndim: int) -> list[Any]:
  """``spec`` with one entry per dimension (``P('a')`` of a matrix: ``['a',
  None]``), for comparing specs."""
  return list(spec) + [None] * (ndim - len(spec))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from host data that every process holds in full."""
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def decay_mask(params: Any) -> Any:
  """``True`` for the dense-layer kernels, the only weights that decay (not
  the biases, LayerNorms and embeddings, as in the paper's GPT-2 code)."""

  def is_kernel(path: tuple[Any, ...], _: Any) -> bool:
    return any(getattr(key, 'key', None) == 'kernel' for key in path)

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def learning_rate_schedule(
    config: configs.Config, name: configs.Optimizer
) -> optax.Schedule:
  """Linear warmup from 0 to ``name``'s peak learning rate, then cosine
  decay to ``end_lr_ratio`` times it."""
  peak = config.peak_lr(name)
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, config.warmup_steps, config.steps, peak * config.end_lr_ratio
  )


def state_kwargs(config: configs.Config, name: str) -> dict[str, Any]:
  """How optimizer ``name`` stores its state: AdEMAMix's ``state_format``,
  or ``state_dtype``'s dtype and rounding (AdamW: its ``mu`` in that dtype)."""
  if config.state_format is not None and name != 'adamw':
    return {'state_format': config.state_format}
  if config.state_dtype == 'float32':
    return {}
  dtype, _, rounding = config.state_dtype.partition('-')
  kwargs = {'mu_dtype': jnp.dtype(dtype)}
  if name != 'adamw':
    kwargs.update(nu_dtype=kwargs['mu_dtype'])
    kwargs.update(stochastic_rounding=rounding != 'nearest')
  return kwargs


def make_optimizer(
    name: str, config: configs.Config
) -> optax.GradientTransformation:
  """Gradient clipping, then optimizer ``name`` with masked weight decay."""
  lr = learning_rate_schedule(config, name)
  kwargs = dict(b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  kwargs.update(mask=decay_mask, **state_kwargs(config, name))
  if name == 'adamw':
    tx = optax.adamw(lr, **kwargs)
  elif name == 'ademamix':
    kwargs.update(alpha=config.alpha, t_alpha_beta3=config.steps)
    tx = amx.ademamix(lr, b3=config.resolved_b3, **kwargs)
  elif name == 'simplified_ademamix':
    # The authors' recipe: b1 warms up from AdamW's b1 over the run, and the
    # learning rate is AdamW's times sqrt((1 - b1_start) (1 - b1)); the decay
    # is divided by as much, so that lr * weight_decay stays AdamW's.
    scale = math.sqrt((1 - config.b1) * (1 - config.simplified_b1))
    kwargs.update(
        b1=config.simplified_b1, b1_start=config.b1, t_b1=config.steps
    )
    kwargs.update(
        alpha=config.simplified_alpha, weight_decay=config.weight_decay / scale
    )
    tx = amx.simplified_ademamix(lambda count: scale * lr(count), **kwargs)
  else:
    raise ValueError(f'Unknown optimizer {name!r}.')
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)


def logged_schedules(name: str, config: configs.Config) -> dict[str, list]:
  """The learning rate (and AdEMAMix's alpha and b3) of steps 1..steps.

  Optax evaluates the learning rate at the 0-based count and the AdEMAMix
  warmups at the 1-based step; entry ``i`` is what step ``i + 1`` used.
  """
  count, steps = jnp.arange(config.steps), config.steps
  out = {'lr': learning_rate_schedule(config, name)(count)}
  if name == 'ademamix':
    out['alpha'] = amx.alpha_warmup(config.alpha, steps)(count + 1)
    b3 = amx.beta3_warmup(config.resolved_b3, steps, b_start=config.b1)
    out['b3'] = b3(count + 1)
  return {k: [float(f'{v:.7g}') for v in np.asarray(a)] for k, a in out.items()}


@dataclasses.dataclass(frozen=True)
class Program:
  """One optimizer's training program, built and compiled once.

  Attributes:
    graphdef: The static structure of the (model, optimizer) pair.
    abstract_state: Their state as ``ShapeDtypeStruct``s with shardings.
    init: Returns a freshly initialised state, laid out on the mesh.
    train_step: ``train_step(model, optimizer, seq_BxL1) -> loss``.
  """

  graphdef: Any
  abstract_state: Any
  init: Callable[[], Any]
  train_step: Callable[..., jax.Array]


def make_program(
    name: str, config: configs.Config, mesh: jax.sharding.Mesh
) -> Program:
  """The :class:`Program` of optimizer ``name`` under ``config``, cached:
  repeated runs in one process (tests, notebooks) compile once."""
  compiled_only = {f: getattr(configs.DEFAULT, f) for f in _NOT_COMPILED}
  return _make_program(name, dataclasses.replace(config, **compiled_only), mesh)


@functools.lru_cache(maxsize=8)
def _make_program(name, config, mesh):
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

  def sharded(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    spec = fsdp_spec(x.shape, mesh.shape['model'])
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, spec)
    )

  # The layout comes from an abstract evaluation: no unsharded copy of the
  # parameters or of the optimizer state is ever made.
  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  abstract = jax.tree.map(sharded, abstract)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)

  @nnx.jit
  def train_step(model, optimizer, seq_BxL1):
    def loss_fn(model):
      return model_lib.next_byte_loss(model, seq_BxL1), None

    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    # Keep the new parameters and moments in the layout they came in.
    state = nnx.state((model, optimizer))
    nnx.update(
        (model, optimizer), jax.lax.with_sharding_constraint(state, shardings)
    )
    return loss

  init = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)
  return Program(graphdef, abstract, init, train_step)


@nnx.jit
def eval_step(model: model_lib.TransformerLM, seqs_ExBxL1: jax.Array):
  """Mean loss over ``E`` validation batches, in one compiled call."""
  loss = functools.partial(model_lib.next_byte_loss, model)
  return jax.lax.map(loss, seqs_ExBxL1).mean()


def is_main() -> bool:
  """Whether this is process 0, the one that reports."""
  return jax.process_index() == 0


def say(out: TextIO, text: str) -> None:
  """Writes a line on process 0 only."""
  if is_main():
    out.write(text + '\n')
    out.flush()


def check_finite(name: str, steps: list[int], losses: np.ndarray) -> None:
  """Raises ``FloatingPointError`` at the first NaN or infinite loss."""
  for step, loss in zip(steps, losses):
    if not np.isfinite(loss):
      raise FloatingPointError(
          f'{name}: the loss is {loss} at step {step}; stopping instead of '
          'training on garbage.'
      )


def checkpoint_manager(
    path: pathlib.Path, fresh: bool
) -> ocp.CheckpointManager:
  """Orbax's asynchronous checkpoints in ``path``, emptied if ``fresh``."""
  if fresh:
    if path.exists() and is_main():
      shutil.rmtree(path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'fresh checkpoints {path.name}')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(path.absolute(), options=options)


def restore_or_init(program, manager, config, resume, out):
  """The model, the optimizer, the steps done and the history: from the
  latest checkpoint when resuming and there is one, else freshly made."""
  latest = manager.latest_step() if resume else None
  if latest is None:
    if resume:
      say(
          out,
          f'--resume: no checkpoint found in {manager.directory}; '
          'training starts from step 0.',
      )
    model, optimizer = nnx.merge(program.graphdef, program.init())
    history = dict(step=[], train_loss=[], eval_step=[], val_loss=[])
    return model, optimizer, 0, {**history, 'wall_time_s': 0.0}

  def restore(**items: Any) -> Any:
    return manager.restore(latest, args=ocp.args.Composite(**items))

  meta = restore(meta=ocp.args.JsonRestore())['meta']
  saved = meta['config']
  current = json.loads(json.dumps(dataclasses.asdict(config)))
  if changes := ', '.join(
      configs.changed_fields(saved, current, _RESUMABLE.split())
  ):
    raise cli.UsageError(
        f'Cannot resume: the config changed ({changes}). Use another '
        'workdir, or drop --resume to start over.'
    )
  # Restored straight into the mesh layout of the abstract target.
  state = restore(state=ocp.args.StandardRestore(program.abstract_state))
  model, optimizer = nnx.merge(program.graphdef, state['state'])
  step, position = meta['step'], meta['data_position']
  if position != step or int(optimizer.step[...]) != step:
    raise ValueError(
        f'Checkpoint {latest} is inconsistent: step {step}, data position '
        f'{position}, optimizer step {int(optimizer.step[...])}.'
    )
  return model, optimizer, step, meta['history']


def save_checkpoint(manager, step, model, optimizer, history, config):
  """Saves the state and the metadata at ``step``, in the background."""
  # Training goes on during the save, so the save gets arrays of its own
  # (nnx.state shares the model's Variables) and a copy of the history.
  state = jax.tree.map(lambda x: x, nnx.state((model, optimizer)))
  meta = dict(step=step, history=history, config=dataclasses.asdict(config))
  meta['data_position'] = step  # The index of the next training batch.
  meta = ocp.args.JsonSave(json.loads(json.dumps(meta)))
  state = ocp.args.StandardSave(state)
  manager.save(
      step, args=ocp.args.Composite(state=state, meta=meta), force=True
  )


def train_one(name, config, workdir, corpus, mesh, resume, stop_after, out):
  """Trains (or resumes) optimizer ``name``.

  Returns:
    A dict with ``history`` (every step's train loss, every validation loss,
    the wall time over all sessions), ``step`` (steps done), ``wall_time_s``
    (this session), ``steps_per_s`` (this session, compilation and
    evaluation excluded), ``specs`` (every model and optimizer array's
    partition spec, by path, as :func:`spec_entries`), ``params`` (the final
    parameters as NumPy arrays; ``None`` on several hosts) and, on one host,
    ``num_params``.
  """
  start_time = time.perf_counter()
  program = make_program(name, config, mesh)
  ckpt_dir = workdir / 'checkpoints' / name
  with checkpoint_manager(ckpt_dir, fresh=not resume) as manager:
    model, optimizer, step, history = restore_or_init(
        program, manager, config, resume, out
    )
    first_step, step_time = step, 0.0
    # When training would have started had all sessions run in one go.
    since = start_time - history['wall_time_s']
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    val_ExBxL1 = put_global(
        corpus_lib.val_batches(
            corpus.val_U8, config.eval_batches, config.batch, config.context
        ),
        NamedSharding(mesh, P(None, 'data', None)),
    )
    progress = cli.progress(
        config.steps, name, out=out, initial=step, disable=not is_main()
    )
    pending: list[jax.Array] = []  # The last steps' losses, not yet read.
    with jax.set_mesh(mesh):
      while step < end:
        t0 = time.perf_counter()
        seq_BxL1 = corpus_lib.train_batch(
            corpus.train_U8, config.seed, step, config.batch, config.context
        )
        seq_BxL1 = put_global(seq_BxL1, NamedSharding(mesh, P('data', None)))
        pending.append(program.train_step(model, optimizer, seq_BxL1))
        step += 1
        log_now = step % config.log_every == 0 or step == end
        eval_now = step % config.eval_every == 0 or step == config.steps
        if step == first_step + 1 or log_now or eval_now:
          # Reading the losses waits for the step: the timing below is real.
          losses = np.asarray(jax.device_get(pending))
          steps = list(range(step - len(pending) + 1, step + 1))
          check_finite(name, steps, losses)
          history['step'] += steps
          history['train_loss'] += [float(loss) for loss in losses]
          pending.clear()
        if step > first_step + 1:  # A session's first step compiles.
          step_time += time.perf_counter() - t0
        if eval_now:
          val_loss = float(eval_step(model, val_ExBxL1))
          check_finite(f'{name} (validation)', [step], [val_loss])
          history['eval_step'].append(step)
          history['val_loss'].append(val_loss)
        if log_now or eval_now:
          val = history['val_loss'][-1:]
          progress.set_postfix(
              loss=f"{history['train_loss'][-1]:.3f}",
              val=f'{val[0]:.3f}' if val else '-',
              refresh=False,
          )
          progress.update(step - progress.n)
        if step % config.checkpoint_every == 0 or step == end:
          history['wall_time_s'] = time.perf_counter() - since
          save_checkpoint(manager, step, model, optimizer, history, config)
    progress.close()
  history['wall_time_s'] = time.perf_counter() - since

  timed_steps = step - first_step - 1
  run = {'history': history, 'step': step, 'params': None}
  run['steps_per_s'] = timed_steps / step_time if step_time else None
  run['specs'] = {
      prefix + jax.tree_util.keystr(path): spec_entries(x.sharding.spec, x.ndim)
      for prefix, node in (('model', model), ('optimizer', optimizer))
      for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(node))
  }
  if jax.process_count() == 1:
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    run['params'] = params
    run['num_params'] = sum(x.size for x in jax.tree.leaves(params))
  run['wall_time_s'] = time.perf_counter() - start_time
  return run


def train_and_evaluate(
    config: configs.Config,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
  """Trains each optimizer of ``config.optimizers`` in turn, then reports.

  Args:
    config: The run's settings.
    workdir: Gets ``checkpoints/<optimizer>/`` (orbax) and, once every
      optimizer has reached ``config.steps``, ``curves.json``,
      ``loss_curves.png`` and ``results.md`` (the printed table).
    resume: Continue each optimizer from its latest checkpoint, if any;
      without it, the old checkpoints of the optimizers trained are deleted.
    stop_after: Stop each optimizer after this many steps in all, with a
      checkpoint, as if interrupted; ``resume`` continues.
    out: Where the progress and the results go.

  Returns:
    ``runs`` (per optimizer: see :func:`train_one`), ``summary`` (the
    table's numbers) and ``corpus`` (its description).
  """
  start_time = time.perf_counter()
  workdir = pathlib.Path(workdir)
  if is_main():
    workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(config)
  t0 = time.perf_counter()
  corpus = corpus_lib.load_corpus(
      config.data, config.max_bytes, config.val_fraction
  )
  corpus_lib.check_length(
      corpus, config.context, config.eval_batches * config.batch
  )
  load_s = time.perf_counter() - t0
  files = (
      f' ({corpus.num_train_files} / {corpus.num_val_files} files)'
      if corpus.num_train_files
      else ''
  )
  lrs = (f'{report.label(n)} {config.peak_lr(n):g}' for n in config.optimizers)
  say(
      out,
      f'Data: {corpus.source}\n  train {len(corpus.train_U8):,} bytes, '
      f'validation {len(corpus.val_U8):,} bytes{files}, loaded in '
      f'{load_s:.1f}s\nMesh: {dict(mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s)\nModel: d_model='
      f'{config.d_model} layers={config.layers} heads={config.heads} '
      f'context={config.context}; {config.steps} steps of {config.batch} x '
      f'{config.context} bytes, peak lr {", ".join(lrs)}; AdEMAMix '
      f'b3={config.resolved_b3:g} alpha={config.alpha:g} '
      f'T_alpha_beta3={config.steps}',
  )
  runs = {}
  for name in config.optimizers:
    args = (name, config, workdir, corpus, mesh, resume, stop_after, out)
    runs[name] = train_one(*args)
  summary = report.summarize(config, runs)
  if is_main():
    table = report.results_table(config, summary)
    say(out, '\n' + table)
    if all(run['step'] == config.steps for run in runs.values()):
      curves = {
          name: {**run['history'], **logged_schedules(name, config)}
          for name, run in runs.items()
      }
      payload = report.curves_payload(config, corpus, summary, curves)
      shared_report.write_json(workdir / 'curves.json', payload)
      report.plot_curves(workdir / 'loss_curves.png', config, curves)
      (workdir / 'results.md').write_text(table + '\n')
      say(
          out,
          f'\nWrote {workdir}/curves.json, loss_curves.png, results.md; '
          f'total time {time.perf_counter() - start_time:.0f}s.',
      )
    else:
      say(out, f'\nStopped before step {config.steps}; continue with --resume.')
  return {'runs': runs, 'summary': summary, 'corpus': corpus.source}
