"""ggml's quantized CPU matrix products, called from PyTorch through ctypes.

On a CPU, batch-1 decoding reads every weight once per token, so its speed is the number of bytes
it reads. A GGUF file's weights are already small (Q4_K, Q5_0, Q8_0...: 4.5 to 8.5 bits a
weight), and ggml, llama.cpp's tensor library, multiplies them as they are: it quantizes the
activations to 8 bits and runs integer dot products over the blocks. PyTorch has no kernel for
these formats, so without ggml the backbone is dequantized to float32 or bfloat16 and reads 2 to 4
times the bytes. This module borrows ggml from the llama-cpp-python package (`pip install
'riverllm[ggml]'`), which builds it for this CPU, and runs one ggml graph per product
(a matrix, or a layer's q/k/v or gate/up matrices side by side).

Only the public ggml API is used (ggml.h, ggml-backend.h, ggml-cpu.h): a context that allocates
nothing, tensors placed on memory we own (`ggml_backend_cpu_buffer_from_ptr` +
`ggml_backend_tensor_alloc`), `ggml_mul_mat`, and the CPU backend's `ggml_backend_graph_compute`.
The weights stay in the GGUF's own bytes (Q4_K ones in the CPU backend's repacked layout, found
through the backend registry's `ggml_backend_dev_get_extra_bufts`); activations and results are
float32 torch tensors.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from riverllm.errors import RiverError

# enum ggml_type (ggml.h); the values are the GGUF file's own tensor type codes.
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 0, 1, 2, 3, 6, 7, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_BF16 = 12, 13, 14, 30

INSTALL_HINT = "pip install 'riverllm[ggml]' (it builds llama-cpp-python, which carries ggml)"


class InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def library_dir() -> Path:
    """Where llama-cpp-python keeps its shared libraries (without importing it: that loads llama)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RiverError(f"the ggml kernels need llama-cpp-python: {INSTALL_HINT}")
    return Path(spec.origin).parent / "lib"


class GGML:
    """The few ggml functions riverllm calls, with their C signatures."""

    def __init__(self, lib_dir: Path):
        try:
            base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
            cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise RiverError(f"cannot load ggml from {lib_dir} ({error}): {INSTALL_HINT}") from None
        p, size, i64, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int

        def bind(lib, name, restype, *argtypes):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, list(argtypes)
            setattr(self, name, function)

        bind(base, "ggml_init", p, InitParams)
        bind(base, "ggml_free", None, p)
        bind(base, "ggml_tensor_overhead", size)
        bind(base, "ggml_graph_overhead_custom", size, size, ctypes.c_bool)
        bind(base, "ggml_row_size", size, i32, i64)
        bind(base, "ggml_blck_size", i64, i32)
        bind(base, "ggml_new_tensor_2d", p, p, i32, i64, i64)
        bind(base, "ggml_mul_mat", p, p, p, p)
        bind(base, "ggml_new_graph_custom", p, p, size, ctypes.c_bool)
        bind(base, "ggml_view_2d", p, p, p, i64, i64, size, size)
        bind(base, "ggml_backend_view_init", i32, p)
        bind(base, "ggml_backend_buft_name", ctypes.c_char_p, p)
        bind(base, "ggml_backend_buft_alloc_buffer", p, p, size)
        bind(base, "ggml_backend_buft_get_alloc_size", size, p, p)
        bind(base, "ggml_backend_buffer_get_base", p, p)
        bind(base, "ggml_backend_tensor_set", None, p, p, size, size)
        bind(base, "ggml_backend_reg_dev_get", p, p, size)
        bind(base, "ggml_backend_reg_get_proc_address", p, p, ctypes.c_char_p)
        bind(cpu, "ggml_backend_cpu_reg", p)
        bind(base, "ggml_build_forward_expand", None, p, p)
        bind(base, "ggml_backend_cpu_buffer_from_ptr", p, p, size)
        bind(base, "ggml_backend_buffer_free", None, p)
        bind(base, "ggml_backend_tensor_alloc", i32, p, p, p)
        bind(base, "ggml_backend_graph_compute", i32, p, p)
        bind(cpu, "ggml_backend_cpu_init", p)
        bind(cpu, "ggml_backend_cpu_set_n_threads", None, p, i32)
        bind(cpu, "ggml_backend_cpu_set_use_ref", None, p, ctypes.c_bool)
        self.backend = self.ggml_backend_cpu_init()
        # One kernel per matrix type whatever the row count, so that a row's result never depends
        # on what it is batched with. ggml's CPU backend switches K-quant products (Q4_K, Q6_K...)
        # to a tiled kernel at 8 or more rows, whose sums round differently from its 1-7 row
        # kernel; "use_ref" keeps the row-by-row kernel (and llamafile's GEMMs for Q8_0/Q5_0/Q4_0,
        # which are row-independent at any count). Costs ~2x on K-quant matrices at 16 rows.
        self.ggml_backend_cpu_set_use_ref(self.backend, True)
        self.lock = threading.Lock()  # one backend and work buffer, per-graph input/output buffers
        self.repack_buffer_type = self._repack_buffer_type()

    def _repack_buffer_type(self) -> int | None:
        """ggml-cpu's CPU_REPACK buffer type, where llama.cpp keeps the matrices it re-lays out for
        its SIMD matrix-vector kernels (None in a build without it)."""
        registry = self.ggml_backend_cpu_reg()
        address = self.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return None
        types = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(
            self.ggml_backend_reg_dev_get(registry, 0))
        index = 0
        while types[index]:
            if self.ggml_backend_buft_name(types[index]) == b"CPU_REPACK":
                return types[index]
            index += 1
        return None

    def compute(self, graph: int, threads: int) -> None:
        """Run a graph (the caller holds `lock`: the backend and each graph's buffers are shared)."""
        self.ggml_backend_cpu_set_n_threads(self.backend, threads)
        status = self.ggml_backend_graph_compute(self.backend, graph)
        if status != 0:
            raise RiverError(f"ggml graph computation failed (status {status})")


@lru_cache(maxsize=1)
def load() -> GGML:
    return GGML(library_dir())


def available() -> bool:
    try:
        load()
    except RiverError:
        return False
    return True


ALIGNMENT = 64  # ggml wants tensor memory 32-byte aligned; numpy promises only 16


def aligned(array: np.ndarray) -> np.ndarray:
    """`array` itself if its memory is ALIGNMENT-aligned, else an aligned copy."""
    if array.ctypes.data % ALIGNMENT == 0:
        return array
    raw = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


# Formats whose matrix-vector product runs on ggml's repacked layout (CPU_REPACK): Q4_K, as
# llama.cpp does, interleaved 8 rows at a time (out_features must be a multiple of 8). Measured on
# the 1.5B Qwen (Q4_K_M, docs/kernels.md). Other formats stay as stored: this build repacks no
# other format the packaged files use for x86 (its Q6_K path crashes in the repack here).
REPACK_TYPES = (GGML_Q4_K,)


class QuantBlocks:
    """One weight matrix [out, in] in one of ggml's formats, as raw blocks (uint8 [out, row_bytes]:
    often a read-only view of the memory-mapped GGUF file, which ggml only reads), placed where
    ggml can read it.

    A REPACK_TYPES matrix is copied once into ggml's repack buffer instead (`repacked`): its
    matrix-vector kernel there is faster, but its products over 4 or more rows take another
    kernel with other rounding, so `QuantMatrix` multiplies such a matrix one row at a time."""

    def __init__(self, blocks: np.ndarray, ggml_type: int, in_features: int):
        self.ggml = g = load()
        row_bytes = g.ggml_row_size(ggml_type, in_features)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != row_bytes \
                or not blocks.flags.c_contiguous:
            raise RiverError(f"ggml type {ggml_type} rows of {in_features} weights take {row_bytes} bytes; "
                             f"got a {blocks.shape} {blocks.dtype} array")
        self.type, self.in_features, self.out_features = ggml_type, in_features, blocks.shape[0]
        self.nbytes = blocks.nbytes
        self.repacked = (g.repack_buffer_type is not None and ggml_type in REPACK_TYPES
                         and self.out_features % 8 == 0)
        if not self.repacked:
            self.blocks = aligned(blocks)
            self.buffer = g.ggml_backend_cpu_buffer_from_ptr(self.blocks.ctypes.data, self.blocks.nbytes)
            self.data = self.blocks.ctypes.data
            return
        context = g.ggml_init(InitParams(g.ggml_tensor_overhead(), None, True))
        try:
            weight = g.ggml_new_tensor_2d(context, ggml_type, in_features, self.out_features)
            self.buffer = g.ggml_backend_buft_alloc_buffer(
                g.repack_buffer_type, g.ggml_backend_buft_get_alloc_size(g.repack_buffer_type, weight))
            if not self.buffer:
                raise RiverError(f"ggml could not allocate {blocks.nbytes} bytes for a repacked matrix")
            self.data = g.ggml_backend_buffer_get_base(self.buffer)
            if g.ggml_backend_tensor_alloc(self.buffer, weight, self.data):
                raise RiverError("ggml could not place a repacked matrix")
            blocks = np.ascontiguousarray(blocks)
            g.ggml_backend_tensor_set(weight, blocks.ctypes.data, 0, blocks.nbytes)  # repacks
        finally:
            g.ggml_free(context)

    def __del__(self):
        if getattr(self, "buffer", None):
            self.ggml.ggml_backend_buffer_free(self.buffer)


class QuantMatrix:
    """x @ W.T, where W stacks the rows of one or more `QuantBlocks` that share their input (a
    layer's q, k and v, or its gate and up projections): `matmul(x)` = cat([x @ W_i.T], -1).
    The products run in one ggml graph: one call into ggml and one copy of the input per step
    instead of one per matrix, with each product computed exactly as it is alone. Activations of
    any float dtype are copied into a float32 buffer."""

    def __init__(self, parts: list[QuantBlocks]):
        if not parts or len({part.in_features for part in parts}) != 1:
            raise RiverError("the matrices of one product must share their input width")
        self.ggml = load()
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)
        self.graphs: dict[int, tuple] = {}  # rows -> (context, graph, input, output, buffers)

    @classmethod
    def of(cls, blocks: np.ndarray, ggml_type: int, in_features: int) -> "QuantMatrix":
        """A product with one matrix."""
        return cls([QuantBlocks(blocks, ggml_type, in_features)])

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def __del__(self):
        for graph in getattr(self, "graphs", {}).values():
            self._free(graph)

    def _free(self, graph: tuple) -> None:
        context, *_, buffers = graph
        for buffer in buffers:
            self.ggml.ggml_backend_buffer_free(buffer)
        self.ggml.ggml_free(context)

    def _graph(self, rows: int) -> tuple:
        graph = self.graphs.get(rows)
        if graph is not None:
            return graph
        g = self.ggml
        # per part: its weight, and one product (+ one row view per row for a repacked one)
        nodes = sum(1 + (2 * rows if part.repacked and rows > 1 else 1) for part in self.parts) + 1
        context = g.ggml_init(InitParams(g.ggml_tensor_overhead() * nodes + g.ggml_graph_overhead_custom(nodes, False),
                                         None, True))
        x = g.ggml_new_tensor_2d(context, GGML_F32, self.in_features, rows)
        cgraph = g.ggml_new_graph_custom(context, nodes, False)
        inputs = torch.empty(rows, self.in_features)
        # Part i's result [rows, out_i] lies contiguous at rows * (out_0 + ... + out_{i-1}).
        outputs = torch.empty(rows * self.out_features)
        buffers = [g.ggml_backend_cpu_buffer_from_ptr(m.data_ptr(), m.numel() * 4) for m in (inputs, outputs)]
        graph = (context, cgraph, inputs, outputs, buffers)
        placed = [g.ggml_backend_tensor_alloc(buffers[0], x, inputs.data_ptr())]
        offset = 0
        for part in self.parts:
            weight = g.ggml_new_tensor_2d(context, part.type, self.in_features, part.out_features)
            placed.append(g.ggml_backend_tensor_alloc(part.buffer, weight, part.data))
            if part.repacked and rows > 1:  # one matrix-vector product per row (see QuantBlocks)
                for row in range(rows):
                    x_row = g.ggml_view_2d(context, x, self.in_features, 1, 4 * self.in_features,
                                           4 * self.in_features * row)
                    placed.append(g.ggml_backend_view_init(x_row))
                    y = g.ggml_mul_mat(context, weight, x_row)
                    g.ggml_build_forward_expand(cgraph, y)
                    placed.append(g.ggml_backend_tensor_alloc(
                        buffers[1], y, outputs.data_ptr() + 4 * (rows * offset + row * part.out_features)))
            else:
                y = g.ggml_mul_mat(context, weight, x)
                g.ggml_build_forward_expand(cgraph, y)
                placed.append(g.ggml_backend_tensor_alloc(buffers[1], y, outputs.data_ptr() + 4 * rows * offset))
            offset += part.out_features
        if any(placed):
            self._free(graph)
            raise RiverError(f"ggml could not place a {rows}-row product's tensors (status {max(placed)})")
        if rows <= 16:  # decoding shapes recur (they are kept); a prompt's length rarely does
            self.graphs[rows] = graph
        return graph

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        with self.ggml.lock:
            graph = self._graph(rows)
            _, cgraph, inputs, outputs, _ = graph
            inputs.copy_(x)
            self.ggml.compute(cgraph, torch.get_num_threads())
            if len(self.parts) == 1 or rows == 1:  # one row: the parts lie side by side already
                result = outputs.view(rows, self.out_features).clone()
            else:
                pieces, offset = [], 0
                for part in self.parts:
                    pieces.append(outputs[rows * offset:rows * (offset + part.out_features)].view(rows, -1))
                    offset += part.out_features
                result = torch.cat(pieces, dim=1)
            if rows not in self.graphs:
                self._free(graph)
        return result
