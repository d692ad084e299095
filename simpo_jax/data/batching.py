"""Padded pair batches with static shapes; the training order is a pure function of (seed, step).

Each epoch is a random permutation cut into global batches, as TRL's and the original SimPO
trainer's random samplers; group_by_length instead sorts windows of WINDOW_BATCHES global batches
by length (less padding, but a step is then all-short or all-long pairs).

Batch (numpy), B = pairs in this process's slice, T = padded length:
  input_ids int32 [B, 2, T]: index 0 = prompt + chosen, 1 = prompt + rejected, right-padded;
  completion_start int32 [B, 2]: prompt length; lengths int32 [B, 2]: prompt + completion length;
  pair_mask float32 [B]: 1 for a real pair, 0 for padding. Scored tokens are [completion_start,
  lengths): the mask comes from positions, never from pad ids (pad may equal EOS).
"""

import numpy as np

WINDOW_BATCHES = 64  # group_by_length: length-sorted windows of this many global batches


def steps_per_epoch(pairs, batch_size: int) -> int:
    """Global batches per epoch; the remainder (num_pairs % batch_size) is dropped each epoch."""
    return pairs.num_pairs // batch_size


def default_buckets(max_length: int) -> tuple:
    """Powers of two from 64 below max_length, plus max_length."""
    buckets, t = [], 64
    while t < max_length:
        buckets.append(t)
        t *= 2
    return tuple(buckets) + (max_length,)


def epoch_order(lengths: np.ndarray, global_batch: int, seed: int, epoch: int,
                group_by_length: bool = False) -> np.ndarray:
    """[steps_per_epoch, global_batch] pair indices: shuffled (then length-sorted inside windows
    of batches, which are shuffled, if group_by_length)."""
    steps = len(lengths) // global_batch
    rng = np.random.default_rng([seed, epoch])
    rows = rng.permutation(len(lengths))[:steps * global_batch]
    if not group_by_length:
        return rows.reshape(steps, global_batch)
    batches = []
    window = WINDOW_BATCHES * global_batch
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")].reshape(-1, global_batch)
        batches.append(chunk[rng.permutation(len(chunk))])
    return np.concatenate(batches) if batches else np.zeros((0, global_batch), np.int64)


def train_batches(pairs, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, pad_id: int, max_length: int, length_buckets=None,
                  group_by_length: bool = False):
    """This process's `batch_size` rows of global batch (batch_size * process_count) for steps
    start_step, start_step + 1, ... forever; epoch e = step // steps_per_epoch."""
    global_batch = batch_size * process_count
    steps = steps_per_epoch(pairs, global_batch)
    if steps < 1:
        raise ValueError(f"{pairs.num_pairs} pairs are fewer than one global batch of {global_batch}.")
    buckets = tuple(sorted(length_buckets or default_buckets(max_length)))
    lengths = pairs.lengths()
    step, epoch, order = start_step, None, None
    while True:
        if step // steps != epoch:
            epoch = step // steps
            order = epoch_order(lengths, global_batch, seed, epoch, group_by_length)
        rows = order[step % steps]
        width = _bucket(int(lengths[rows].max()), buckets)  # same T on every process
        local = rows[process_index * batch_size:(process_index + 1) * batch_size]
        yield make_batch(pairs, local, np.ones(len(local), np.float32), pad_id, width)
        step += 1


def eval_batches(pairs, *, batch_size: int, pad_id: int, max_length: int, process_index: int = 0,
                 process_count: int = 1, length_buckets=None):
    """The whole split in order; the last global batch is filled with copies of pair 0, masked out."""
    global_batch = batch_size * process_count
    buckets = tuple(sorted(length_buckets or default_buckets(max_length)))
    lengths = pairs.lengths()
    for start in range(0, pairs.num_pairs, global_batch):
        rows = np.arange(start, start + global_batch)
        mask = (rows < pairs.num_pairs).astype(np.float32)
        rows = np.where(mask > 0, rows, 0)  # dummies copy a real pair: finite losses, masked out
        width = _bucket(int(lengths[rows].max()), buckets)
        part = slice(process_index * batch_size, (process_index + 1) * batch_size)
        yield make_batch(pairs, rows[part], mask[part], pad_id, width)


def make_batch(pairs, rows, pair_mask, pad_id: int, width: int) -> dict:
    input_ids = np.full((len(rows), 2, width), pad_id, np.int32)
    start = np.zeros((len(rows), 2), np.int32)
    lengths = np.zeros((len(rows), 2), np.int32)
    for b, i in enumerate(rows):
        prompt = pairs.prompt_ids[i]
        for k, completion in enumerate((pairs.chosen_ids[i], pairs.rejected_ids[i])):
            n = len(prompt) + len(completion)
            input_ids[b, k, :len(prompt)] = prompt
            input_ids[b, k, len(prompt):n] = completion
            start[b, k], lengths[b, k] = len(prompt), n
    return {"input_ids": input_ids, "completion_start": start, "lengths": lengths,
            "pair_mask": np.asarray(pair_mask, np.float32)}


def padding_efficiency(batch: dict) -> float:
    """Tokens of real pairs / (B * 2 * T)."""
    real = float((batch["lengths"] * batch["pair_mask"][:, None]).sum())
    return real / batch["input_ids"].size


def _bucket(longest: int, buckets: tuple) -> int:
    for t in buckets:
        if t >= longest:
            return t
    raise ValueError(f"A pair of {longest} tokens is longer than the largest length bucket "
                     f"{buckets[-1]}; raise length_buckets or max_length.")
