"""A tensor converted or baked a slab of kernels at a time, in bounded memory; no I/O of its own.

The tensor is read through a callable, ``read(offset, out)``, which fills ``out`` with the tensor's bytes from
``offset`` (from a file, or from a tensor in memory), and comes out in pieces ``(byte offset, piece)`` of the
result, in order, each valid until the next is asked for. :func:`spectral_pieces` gives the bits of
:func:`~spectral_cli.transform.bases.to_spectral` on the whole tensor and :func:`spatial_pieces` those of
:func:`~spectral_cli.transform.bases.to_spatial`: slabs hold whole runs of
:func:`~spectral_cli.transform.bases.chunk_rows` kernels, the runs over which the bases take their products.
Slabs are read, transformed and checked side by side on a few threads and handed out in order as soon as each
is done, so that writing overlaps the work and memory holds a few slabs, never the tensor.

Each generator returns (as its ``StopIteration`` value) the one error measure of convert and bake: ``max |diff|
/ max |reference|`` over the tensor, where convert's diff is the round trip (the stored coefficients baked back
against the input kernel) and bake's the rounding of the result to its dtype (against the float64 transform).
"""

from __future__ import annotations

import functools
import itertools
import math
import queue
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

from .bases import chunk_rows, padded_rows, spectral_rows, to_spatial
from .kernels import Basis, spectral_kernel_shape, transform_method
from .matrices import compute_dtype, product_width, row_matrices, row_width
from .separable import synthesis_rows

#: input bytes of one slab, rounded to whole runs of ``chunk_rows`` kernels (at least one run)
SLAB_BYTES = 1 << 20

#: ``read(offset, out)``: fill the contiguous tensor ``out`` with the source tensor's bytes from byte ``offset``
Read = Callable[[int, torch.Tensor], None]

#: the result in pieces ``(byte offset in the result, piece)``, then (as the return value) the relative error
Pieces = Generator[tuple[int, torch.Tensor], None, float]

_T = TypeVar("_T")


class Scratch:
    """Threads and slab buffers reused from tensor to tensor while streaming a file (fresh memory costs page
    faults, far slower to fill than memory already touched; threads of their own keep malloc arenas).

    ``workers``: the threads (default ``torch.get_num_threads()``). Inside a ``with`` block the calling thread runs
    torch single-threaded too (restored at its end): its operations between slabs are small, and each one that
    torch would split wakes an OpenMP team whose threads then spin for milliseconds, keeping another core busy
    (docs/measurements.md). ``close()`` (or the end of the block) stops the threads.
    """

    def __init__(self, slab_bytes: int = SLAB_BYTES, workers: int | None = None) -> None:
        self.slab_bytes = slab_bytes
        self._free: dict[str, queue.SimpleQueue[torch.Tensor]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.workers = max(1, torch.get_num_threads() if workers is None else workers)
        self._caller_threads: list[int] = []

    def __enter__(self) -> Scratch:
        self._caller_threads.append(torch.get_num_threads())
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            torch.set_num_threads(self._caller_threads.pop())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def release(self) -> None:
        """Drop the buffers kept for reuse (between two passes that use buffers of other sizes)."""
        self._free.clear()

    @contextmanager
    def threads(self) -> Iterator[ThreadPoolExecutor]:
        """:attr:`workers` threads, each running torch single-threaded: the slabs run side by side instead of
        splitting each small operation (measured: faster, and far less hurt by other processes on the machine).
        torch's thread count is 1 inside the block and restored after it, also on errors."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="spectral")
            yield self._pool
        finally:
            torch.set_num_threads(threads)

    def take(self, role: str, nbytes: int) -> torch.Tensor:
        """A buffer of ``nbytes`` (uint8, starting at a 64-byte boundary) for one slab; thread-safe. Buffers are
        kept per role, so that a slab's input, output and temporaries each reuse memory of their own size."""
        free = self._free.setdefault(role, queue.SimpleQueue())
        try:
            buffer = free.get_nowait()
        except queue.Empty:
            buffer = torch.empty(0, dtype=torch.uint8)
        if buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer

    def give(self, role: str, buffer: torch.Tensor) -> None:
        """Take back a buffer of :meth:`take` (the whole buffer, not a view of part of it)."""
        self._free[role].put(buffer)

    @contextmanager
    def rows(self, nbytes: int, role: str = "rows") -> Iterator[torch.Tensor]:
        """``nbytes`` of a buffer of :meth:`take`, given back when the block ends."""
        buffer = self.take(role, nbytes)
        try:
            yield buffer[:nbytes]
        finally:
            self.give(role, buffer)

    def in_order(
        self, bounds: Sequence[tuple[int, int]], work: Callable[[int, int], _T], row_bytes: int
    ) -> Iterator[tuple[int, _T]]:
        """``(start, work(start, end))`` for each slab (of kernels of ``row_bytes`` each), in order; a few slabs
        computed ahead on the threads."""
        todo = iter(bounds)
        slab = (bounds[0][1] - bounds[0][0]) * row_bytes if bounds else 0
        with self.threads() as pool:
            # slabs in flight: enough to keep every thread busy while one is written, and not more bytes than
            # that many slabs of slab_bytes (a slab of one large kernel can be far above it) unless only two
            ahead = max(2, 2 * self.workers * self.slab_bytes // max(slab, self.slab_bytes))
            pending = deque((b[0], pool.submit(work, *b)) for b in itertools.islice(todo, ahead))
            try:
                while pending:
                    start, result = pending.popleft()
                    value = result.result()
                    following = next(todo, None)
                    if following is not None:
                        pending.append((following[0], pool.submit(work, *following)))
                    yield start, value
                    del value
            finally:  # stopped early (a failed write, a signal): drop the slabs not started, finish the others
                # (a cancelled slab counts as done only once a worker takes it off the queue: not waited for)
                wait([result for _, result in pending if not result.cancel()])


def slab_bounds(rows: int, kernel_size: tuple[int, ...], row_bytes: int, slab_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of the slabs of a tensor of ``rows`` kernels: whole runs of ``chunk_rows``, about ``slab_bytes``
    of input each."""
    run = chunk_rows(kernel_size)
    per_slab = run * max(1, slab_bytes // max(1, run * row_bytes))
    return [(i, min(rows, i + per_slab)) for i in range(0, rows, per_slab)]


def spectral_pieces(
    read: Read,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ks: tuple[int, ...],
    basis: Basis,
    scratch: Scratch,
    measure: bool = True,
) -> Pieces:
    """``to_spectral`` of the weight of ``shape`` and ``dtype`` read through ``read``: the bits of the whole, in
    bounded memory, and the round-trip error (the stored coefficients baked back against the weight; NaN when
    not measured: a file writer measures it on what it wrote, :func:`spatial_pieces` of the written
    coefficients against the weight)."""
    taps = math.prod(ks)
    rows = math.prod(shape) // taps
    if rows == 0:
        return 0.0
    row_bytes = taps * dtype.itemsize
    width = row_width(ks, basis)
    plane_bytes = rows * width // 2 * dtype.itemsize  # rfft: the real plane, then the imaginary
    out_row_bytes = width // 2 * dtype.itemsize if basis == "rfft" else row_bytes
    cdtype = compute_dtype(dtype)
    method = transform_method(ks)
    columns = product_width(ks, basis, method)

    def work(i: int, j: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        m, padded = j - i, padded_rows(j - i, method)  # a tensor's last rows padded, as to_spectral does
        with scratch.rows(padded * taps * dtype.itemsize, "in") as raw:
            weight = raw.view(dtype).view(padded, taps)
            read(i * row_bytes, weight[:m])
            weight[m:] = 0
            with scratch.rows(padded * columns * cdtype.itemsize, "coefficients") as product:
                out = product.view(cdtype).view(padded, columns)
                coefficients = spectral_rows(weight.to(cdtype), ks, basis, out=out, method=method)
                lease = scratch.take("out", m * width * dtype.itemsize)  # given back once written
                stored = lease[: m * width * dtype.itemsize].view(dtype)
                if basis == "rfft":  # planes: all the real parts, then all the imaginary parts
                    planes = stored.view(2, m, width // 2)
                    planes.copy_(coefficients[:m].view(m, 2, width // 2).transpose(0, 1))
                    rounded = planes.transpose(0, 1).reshape(m, width) if dtype != cdtype else coefficients[:m]
                    pieces = [planes[0], planes[1]]
                else:
                    pieces = [stored.view(m, width)]
                    pieces[0].copy_(coefficients[:m])
                    rounded = pieces[0]
                error = _round_trip_error(scratch, [rounded], weight[:m], ks, basis) if measure else _UNMEASURED
        return pieces, error, lease

    errors = []
    bounds = slab_bounds(rows, ks, row_bytes, scratch.slab_bytes)
    for i, (pieces, error, lease) in scratch.in_order(bounds, work, row_bytes):
        errors.append(error)
        for p, piece in enumerate(pieces):  # rfft: the real plane's rows i:j, then the imaginary plane's
            yield p * plane_bytes + i * out_row_bytes, piece
        scratch.give("out", lease)
    return _relative_error(errors)


def _coefficient_layout(shape: tuple[int, ...], ks: tuple[int, ...], basis: Basis) -> tuple[int, tuple[int, ...], int]:
    """How stored coefficients of ``shape`` lie: planes (rfft: real, imaginary), one row's trailing shape, rows."""
    planes = 2 if basis == "rfft" else 1
    trailing = tuple(shape[len(shape) - len(ks) :])
    return planes, trailing, math.prod(shape) // (planes * math.prod(trailing))


def _read_coefficients(
    read: Read, buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], ks: tuple[int, ...], basis: Basis,
    i: int, j: int,
) -> torch.Tensor:  # fmt: skip
    """Rows ``i:j`` of the stored coefficients into ``buffer``, as ``to_spatial`` takes them."""
    planes, trailing, rows = _coefficient_layout(shape, ks, basis)
    row_bytes = math.prod(trailing) * dtype.itemsize
    x = buffer.view(dtype).view(planes, j - i, *trailing)
    for p in range(planes):  # plane p holds rows p * rows ... (p + 1) * rows of the stored tensor
        read((p * rows + i) * row_bytes, x[p])
    return x if basis == "rfft" else x[0]


def spatial_pieces(
    read: Read,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ks: tuple[int, ...],
    basis: Basis,
    out_dtype: torch.dtype,
    scratch: Scratch,
    measure: bool = True,
) -> Pieces:
    """``to_spatial`` of the ``basis`` coefficients of ``shape`` and ``dtype`` read through ``read``, cast to
    ``out_dtype``: the bits of the whole, in bounded memory, and the rounding error (against float64; NaN when
    not measured)."""
    planes, trailing, rows = _coefficient_layout(shape, ks, basis)
    if rows == 0:
        return 0.0
    row_bytes = math.prod(trailing) * dtype.itemsize  # of one plane
    out_row_bytes = math.prod(ks) * out_dtype.itemsize

    def work(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        with scratch.rows(planes * (j - i) * row_bytes) as buffer:
            x = _read_coefficients(read, buffer, dtype, shape, ks, basis, i, j)
            if out_dtype == torch.float64:  # asked for float64: computed in it (the reference of a bake's rounding)
                x = x.to(torch.float64)
            weight = to_spatial(x, ks, basis).to(out_dtype)
            if not measure:
                return weight, _UNMEASURED
            return weight, _slab_error(weight, to_spatial(x.to(torch.float64), ks, basis))

    errors = []
    bounds = slab_bounds(rows, ks, planes * row_bytes, scratch.slab_bytes)
    for i, (weight, error) in scratch.in_order(bounds, work, planes * row_bytes):
        errors.append(error)
        yield i * out_row_bytes, weight
    return _relative_error(errors)


def synthesis_error(
    read: Read,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ks: tuple[int, ...],
    basis: Basis,
    kernels: Read,
    kernel_dtype: torch.dtype,
    scratch: Scratch,
    *,
    exact: bool,
) -> float:
    """The relative error between the kernels that the ``basis`` coefficients of ``shape`` and ``dtype`` (read
    through ``read``) synthesize and the kernels of ``kernel_dtype`` read through ``kernels``, slab by slab on the
    threads, in bounded memory.

    ``exact=False``, a convert's round trip: the synthesis rounded to ``kernel_dtype`` against the kernels (the
    input's), relative to the kernels. ``exact=True``, a bake's rounding: the kernels (the written ones) against the
    synthesis in float64, relative to it.
    """
    planes, trailing, rows = _coefficient_layout(shape, ks, basis)
    if rows == 0:
        return 0.0
    row_bytes = math.prod(trailing) * dtype.itemsize  # of one plane
    kernel_bytes = math.prod(ks) * kernel_dtype.itemsize

    def work(i: int, j: int) -> torch.Tensor:
        with scratch.rows(planes * (j - i) * row_bytes) as buffer, scratch.rows((j - i) * kernel_bytes, "k") as raw:
            x = _read_coefficients(read, buffer, dtype, shape, ks, basis, i, j)
            kernel = raw.view(kernel_dtype)
            kernels(i * kernel_bytes, kernel)
            if exact:
                synthesized = to_spatial(x.to(torch.float64), ks, basis).reshape(-1)
                return _slab_error(kernel, synthesized)
            # through the writer's own round-trip check (its products are laid out for speed), the planes as the
            # column blocks of the rows spectral_rows gives (rfft: each row's real parts, then its imaginary ones)
            m = j - i
            blocks = [x[p].reshape(m, -1) for p in range(planes)] if basis == "rfft" else [x.reshape(m, -1)]
            return _round_trip_error(scratch, blocks, kernel.view(m, -1), ks, basis)

    bounds = slab_bounds(rows, ks, planes * row_bytes, scratch.slab_bytes)
    return relative_error([error for _, error in scratch.in_order(bounds, work, planes * row_bytes)])


def _round_trip_error(
    scratch: Scratch,
    coefficients: Sequence[torch.Tensor],
    weight: torch.Tensor,
    ks: tuple[int, ...],
    basis: Basis,
) -> torch.Tensor:
    """:func:`_slab_error` of the kernels synthesized from ``coefficients`` (the stored numbers: rows as
    ``spectral_rows`` gives them, in column blocks side by side, such as the planes of a file) against ``weight``
    (one flattened kernel per row), without new memory for float32 and float64."""
    dtype, cdtype = weight.dtype, compute_dtype(weight.dtype)
    blocks = [block.to(cdtype) for block in coefficients]
    m, taps = weight.shape
    with scratch.rows(m * taps * cdtype.itemsize, "back") as raw:
        back = raw.view(cdtype)
        synthesis = row_matrices(basis, ks, cdtype).synthesis if transform_method(ks) == "dense" else None
        if synthesis is None:
            c = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
            back, expected = back.view(m, taps).copy_(synthesis_rows(c, ks, basis)), weight
        else:  # a product per block, summed: the blocks are not copied side by side
            rows = itertools.accumulate((block.shape[1] for block in blocks), initial=0)
            parts = [(synthesis[a:b], block) for (a, b), block in zip(itertools.pairwise(rows), blocks, strict=True)]
            if taps < 16:  # narrow products are slow row by row (docs/measurements.md); transposed they are wide
                back, expected = back.view(taps, m), weight.T
                for k, (s, block) in enumerate(parts):
                    torch.mm(s.T, block.T, out=back) if k == 0 else back.addmm_(s.T, block.T)
            else:
                back, expected = back.view(m, taps), weight
                for k, (s, block) in enumerate(parts):
                    torch.mm(block, s, out=back) if k == 0 else back.addmm_(block, s)
        if dtype != cdtype:  # compare what to_spatial would give: rounded to the stored dtype
            back = back.to(dtype).to(cdtype)
        diff = torch.aminmax(back.sub_(expected) if dtype == cdtype else back - expected.to(cdtype))
    scale = torch.aminmax(weight)
    return torch.stack((torch.maximum(-diff.min, diff.max), torch.maximum(-scale.min, scale.max).to(cdtype))).double()


def _slab_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``[max |actual - expected|, max |expected|]`` of one slab (NaN if either holds NaN).

    Computed in float32, or float64 for float64 tensors: the difference of two close floats is exact
    (Sterbenz), so this is the float64 figure at a third of the cost and memory.
    """
    dtype = torch.promote_types(torch.promote_types(actual.dtype, expected.dtype), torch.float32)
    expected = expected.detach().to(dtype)
    diff = torch.aminmax(actual.detach().to(dtype) - expected)
    scale = torch.aminmax(expected)
    return torch.stack((torch.maximum(-diff.min, diff.max), torch.maximum(-scale.min, scale.max))).double()


#: the error of a slab not measured: ``[NaN, 1]``
_UNMEASURED = torch.tensor([math.nan, 1.0], dtype=torch.float64)


def relative_error(slabs: Sequence[torch.Tensor]) -> float:
    """``max diff / max scale`` over the slabs of :func:`_slab_error` (NaN when a slab holds NaN or Inf; 0 when
    there are none)."""
    return _relative_error(slabs) if slabs else 0.0


def _relative_error(slabs: Sequence[torch.Tensor]) -> float:
    """``max diff / max scale`` over the slabs (NaN when a slab holds NaN or Inf)."""
    diff, scale = torch.stack(list(slabs)).max(dim=0).values.tolist()
    return abs(float(diff / scale if scale > 0 else diff))  # abs: never -0.0


# ---- many small tensors at once --------------------------------------------------------------------------------

#: a tensor of at most this many bytes of kernels (in the compute dtype, its rows padded as a product pads them) is
#: transformed together with others (:func:`spectral_batch`, :func:`spatial_batch`): alone, its torch operations and
#: Python steps would cost far more than its arithmetic (docs/measurements.md)
SMALL_BYTES = 1 << 18
#: the most bytes of kernels (compute dtype, padded rows) in one batch of small tensors
BATCH_BYTES = 1 << 20


@functools.lru_cache(maxsize=4096)  # asked of every step, and of each again as batches are gathered
def batch_rows(rows: int, ks: tuple[int, ...], dtype: torch.dtype) -> int:
    """The rows that a tensor of ``rows`` kernels of ``ks`` takes in a batch (its rows padded as its own product
    pads them), or 0 if it is transformed alone, slab by slab: no kernels, the separable method, more than one run
    of :func:`~spectral_cli.transform.bases.chunk_rows` kernels, or more than :data:`SMALL_BYTES`."""
    if rows == 0 or transform_method(ks) != "dense" or rows > chunk_rows(ks, "dense"):
        return 0
    padded = padded_rows(rows, "dense")
    return padded if padded * math.prod(ks) * compute_dtype(dtype).itemsize <= SMALL_BYTES else 0


class Layout:
    """Where the kernels of several tensors lie in one product: each tensor's rows from a multiple of
    :data:`~spectral_cli.transform.bases.ROW_MULTIPLE` (``starts``), zero rows after them, so that each row has
    the bits that the tensor's own product gives it (the bases' products give a row bits that depend on the row
    alone when they take a multiple of that many rows into fresh memory, whatever their number: see
    :data:`~spectral_cli.transform.bases.ROW_MULTIPLE`). ``offsets``: each tensor's first row when their rows are
    packed one after the other, as they are stored."""

    def __init__(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        padded = [padded_rows(m, "dense") for m in self.rows]
        self.starts = list(itertools.accumulate(padded, initial=0))
        self.total = self.starts.pop()
        self.offsets = list(itertools.accumulate(self.rows, initial=0))
        self.packed = self.offsets.pop()
        counts = torch.tensor(self.rows)
        #: the packed rows' tensor's first packed row, and its rows
        self._first = torch.repeat_interleave(torch.tensor(self.offsets), counts)
        self._count = torch.repeat_interleave(counts, counts)
        #: the tensor of each row of the product
        self.segments = torch.repeat_interleave(torch.arange(len(self.rows)), torch.tensor(padded))
        #: the row of the product that each packed row is
        self.valid = torch.arange(self.packed) + torch.repeat_interleave(
            torch.tensor(self.starts) - torch.tensor(self.offsets), counts
        )

    def planes(self) -> torch.Tensor:
        """rfft: the half rows of the tensors as stored (each tensor all its real parts, then all its imaginary
        parts) in the order of the packed rows' halves (each row's real half, then its imaginary half)."""
        real = torch.arange(self.packed) + self._first
        return torch.stack((real, real + self._count), dim=1).reshape(-1)


def spectral_batch(
    reads: Sequence[Read],
    rows: Sequence[int],
    dtype: torch.dtype,
    ks: tuple[int, ...],
    basis: Basis,
    scratch: Scratch,
    measure: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """``to_spectral`` of several small tensors of ``dtype`` (``rows[k]`` kernels read through ``reads[k]``; see
    :func:`batch_rows`) in one product: the results as stored (rfft: planes), one after the other in one flat
    tensor, and the round-trip error of each (NaN when not ``measure``). Each tensor gets the bits of its own
    :func:`spectral_pieces`."""
    layout = Layout(rows)
    taps, width, cdtype = math.prod(ks), row_width(ks, basis), compute_dtype(dtype)
    columns = product_width(ks, basis, "dense")
    with scratch.rows(layout.total * taps * dtype.itemsize, "in") as raw:
        weight = raw.view(dtype).view(layout.total, taps)
        weight.zero_()
        for read, start, m in zip(reads, layout.starts, layout.rows, strict=True):
            read(0, weight[start : start + m])
        with scratch.rows(layout.total * columns * cdtype.itemsize, "coefficients") as product:
            out = product.view(cdtype).view(layout.total, columns)
            coefficients = spectral_rows(weight.to(cdtype), ks, basis, out=out, method="dense")
            stored = coefficients.index_select(0, layout.valid).to(dtype)
            if basis == "rfft":  # each tensor: all its real parts, then all its imaginary parts
                planes = torch.empty(2 * layout.packed, width // 2, dtype=dtype)
                stored = planes.index_copy_(0, layout.planes(), stored.view(-1, width // 2))
            errors = [math.nan] * len(layout.rows)
            if measure:  # on the stored numbers, in the rows a product takes them in
                rounded = coefficients.to(dtype).to(cdtype) if dtype != cdtype else coefficients.contiguous()
                errors = _round_trip_errors(rounded, weight, ks, basis, layout)
    return stored.view(-1), errors


def coefficient_rows(stored: torch.Tensor, layout: Layout, basis: Basis, cdtype: torch.dtype) -> torch.Tensor:
    """Stored coefficients of several tensors (one flat tensor, one after the other, as :func:`spectral_batch`
    gives them) as the rows of one product, in ``cdtype``: each kernel's numbers side by side (rfft: its real
    parts, then its imaginary ones), each tensor from its row of ``layout``, zero rows between."""
    rows = stored.view(layout.packed * (2 if basis == "rfft" else 1), -1)
    if basis == "rfft":
        rows = rows.index_select(0, layout.planes()).view(layout.packed, -1)
    out = rows.new_zeros((layout.total, rows.shape[1]), dtype=cdtype)
    return out.index_copy_(0, layout.valid, rows.to(cdtype))


def round_trip_errors(
    stored: torch.Tensor, kernels: torch.Tensor, layout: Layout, ks: tuple[int, ...], basis: Basis
) -> list[float]:
    """The round-trip error of each of several tensors: their stored coefficients (one flat tensor, one after the
    other) baked back and rounded to the kernels' dtype, against ``kernels`` (the rows of ``layout``, zero rows
    between), relative to them: the errors :func:`spectral_batch` measures."""
    return _round_trip_errors(coefficient_rows(stored, layout, basis, compute_dtype(kernels.dtype)), kernels, ks,
                              basis, layout)  # fmt: skip


def _round_trip_errors(
    coefficients: torch.Tensor, weight: torch.Tensor, ks: tuple[int, ...], basis: Basis, layout: Layout
) -> list[float]:
    """:func:`_round_trip_error` of each tensor of ``layout``: ``coefficients`` (the stored numbers, compute dtype)
    and ``weight`` (the kernels) as rows of one product. The product takes the rows as the bases' own products do
    (padded rows into fresh memory), so a tensor's error does not depend on the others in its batch."""
    dtype, cdtype = weight.dtype, compute_dtype(weight.dtype)
    width = row_width(ks, basis)
    synthesis = row_matrices(basis, ks, cdtype).synthesis[:width]
    back = torch.mm(coefficients[:, :width].contiguous(), synthesis)
    if dtype != cdtype:  # compare what to_spatial would give: rounded to the stored dtype
        back = back.to(dtype).to(cdtype)
    diff = back.sub_(weight.to(cdtype)).abs_().amax(dim=1)
    return _segment_errors(diff, weight.abs().amax(dim=1), layout)


def spatial_batch(
    reads: Sequence[Read],
    rows: Sequence[int],
    dtype: torch.dtype,
    ks: tuple[int, ...],
    basis: Basis,
    out_dtype: torch.dtype,
    scratch: Scratch,
    measure: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """``to_spatial`` of the ``basis`` coefficients of several small tensors (``rows[k]`` kernels each, read through
    ``reads[k]``) in one product, cast to ``out_dtype``: the kernels one after the other in one flat tensor, and
    the rounding error of each (NaN when not ``measure``). Each tensor gets the bits of its own
    :func:`spatial_pieces`."""
    layout = Layout(rows)
    x = _coefficients_in(reads, layout, dtype, ks, basis)
    if out_dtype == torch.float64:  # asked for float64: computed in it (the reference of a bake's rounding)
        x = x.to(torch.float64)
    weight = to_spatial(x, ks, basis).to(out_dtype).reshape(layout.total, -1)
    errors = _spatial_errors(weight, x, ks, basis, layout) if measure else [math.nan] * len(layout.rows)
    return weight.index_select(0, layout.valid).view(-1), errors


def synthesis_errors(
    reads: Sequence[Read],
    rows: Sequence[int],
    dtype: torch.dtype,
    ks: tuple[int, ...],
    basis: Basis,
    kernels: Sequence[Read],
    kernel_dtype: torch.dtype,
    *,
    exact: bool,
) -> list[float]:
    """:func:`synthesis_error` of several small tensors at once (``rows[k]`` kernels each; their coefficients read
    through ``reads[k]``, their kernels through ``kernels[k]``), with the figures of :func:`spectral_batch`
    (``exact=False``) and :func:`spatial_batch` (``exact=True``)."""
    layout = Layout(rows)
    taps = math.prod(ks)
    weight = torch.zeros(layout.total, taps, dtype=kernel_dtype)
    for read, start, m in zip(kernels, layout.starts, layout.rows, strict=True):
        read(0, weight[start : start + m])
    if exact:
        return _spatial_errors(weight, _coefficients_in(reads, layout, dtype, ks, basis), ks, basis, layout)
    stored = torch.empty(layout.packed * row_width(ks, basis), dtype=dtype)
    width = row_width(ks, basis)
    for read, offset, m in zip(reads, layout.offsets, layout.rows, strict=True):
        read(0, stored[offset * width : (offset + m) * width])
    return round_trip_errors(stored, weight, layout, ks, basis)


def _coefficients_in(
    reads: Sequence[Read], layout: Layout, dtype: torch.dtype, ks: tuple[int, ...], basis: Basis
) -> torch.Tensor:
    """The stored coefficients of the tensors of ``layout`` as ``to_spatial`` takes them: rfft ``(2, rows,
    *bins)``, rdft ``(rows, *ks)``, each tensor from its row of the layout, zero rows between."""
    trailing = spectral_kernel_shape(ks, basis)
    width = row_width(ks, basis)
    stored = torch.empty(layout.packed * width, dtype=dtype)
    for read, offset, m in zip(reads, layout.offsets, layout.rows, strict=True):
        read(0, stored[offset * width : (offset + m) * width])
    rows = coefficient_rows(stored, layout, basis, dtype)
    if basis == "rfft":
        return rows.view(layout.total, 2, *trailing).transpose(0, 1)
    return rows.view(layout.total, *trailing)


def _spatial_errors(
    weight: torch.Tensor, x: torch.Tensor, ks: tuple[int, ...], basis: Basis, layout: Layout
) -> list[float]:
    """:func:`_slab_error` of each tensor of ``layout``: ``weight`` (its kernels, rows of the layout) against the
    float64 synthesis of ``x`` (its coefficients, as ``to_spatial`` takes them)."""
    expected = to_spatial(x.to(torch.float64), ks, basis).reshape(layout.total, -1)
    dtype = torch.promote_types(weight.dtype, torch.float64)
    diff = (weight.to(dtype) - expected).abs_().amax(dim=1)
    return _segment_errors(diff, expected.abs().amax(dim=1), layout)


def _segment_errors(diff: torch.Tensor, scale: torch.Tensor, layout: Layout) -> list[float]:
    """``max diff / max scale`` over each tensor's rows (``diff`` and ``scale`` per row of ``layout``, at least 0 or
    NaN; zero rows count for nothing), as :func:`_relative_error` gives it for one tensor: NaN where a row is."""
    diffs, scales = _segment_max(diff, layout), _segment_max(scale, layout)
    return [abs(d / s if s > 0 else d) for d, s in zip(diffs, scales, strict=True)]


def _segment_max(values: torch.Tensor, layout: Layout) -> list[float]:
    """The largest of ``values`` (per row of ``layout``: at least 0, or NaN) over each tensor's rows, in float64;
    NaN where one is NaN (a scatter's maximum need not say so: counted apart)."""
    values = values.double()
    nan = torch.isnan(values)
    top = torch.zeros(len(layout.rows), dtype=torch.float64)
    top.scatter_reduce_(0, layout.segments, values.masked_fill(nan, 0.0), "amax")
    nans = torch.zeros(len(layout.rows), dtype=torch.float64).index_add_(0, layout.segments, nan.double())
    return top.masked_fill_(nans > 0, math.nan).tolist()
