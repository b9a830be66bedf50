"""Triton kernel of absorbed MLA decode over the paged latent cache (Hopper GPU; called from JAX by
gpu.py through jax-triton). Cache format: lingjax/kernels/mla/__init__.py.

This module imports only triton, so the kernel body can also run in Triton's CPU interpreter
(TRITON_INTERPRET=1, torch tensors) in the tests; jax_triton itself cannot be imported on a CPU-only JAX.

decode_kernel: one program per (block of BLOCK_H heads, request b, split sp of the context), the grid in
that order. The request's context [0, length) is cut into blocks of BLOCK_N tokens; split sp takes a
contiguous run of ceil(n_blocks / NUM_SPLITS) blocks. Per block it looks up the page ids in the page table,
loads the [BLOCK_N, R] latents and [BLOCK_N, ROPE] k_pe rows (masked past the length: rows of unused pages
are never loaded), scores them against the heads' q_lat and q_pe (MQA: all heads share the rows), and keeps
a running max / sum / [BLOCK_H, R] accumulator in float32. It writes the split's normalised output
o[b, sp] [H, R] float32 and log-sum-exp lse[b, sp] [H] (-inf for an empty split, whose o is 0);
gpu.combine_splits merges the splits (with one split, o is the result), or, with COMBINE, the last program
of each request merges them in the same launch. o may be 16-bit (the pages' dtype: half the partials' bytes;
the kernel rounds each split's normalised output to it). Padding rows (slot < 0) read nothing. Options (BLOCK_H,
BLOCK_N, SWAP, REG_PREFETCH, COMBINE): the kernel's docstring.
decode_stream_kernel: the same attention with the batch's blocks cut into equal runs, one per program
(stream-K: balanced whatever the lengths); its docstring.
The queries are cast to the pages' dtype for the products (bf16 tensor cores for a bf16 cache); the
probabilities are cast to it for the second product, as flash attention does; sums stay float32.
PRECISION: "" for 16-bit pages, or a tl.dot input_precision for float32 pages ("tf32x3", "ieee", "tf32").
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "":
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _block(c, kpe, q, qp, valid, m, l, acc, SCALE: tl.constexpr, PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """One block of BLOCK_N tokens: scores against the heads, online-softmax update of (m, l, acc)."""
    dtype = c.dtype
    if SWAP:
        s = _dot(c, q, PRECISION) + _dot(kpe, qp, PRECISION)                       # [BLOCK_N, BLOCK_H]
        s = tl.where(valid[:, None], s * SCALE, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))         # finite: the block's first token is valid
        p = tl.exp(s - m_new[None, :])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :] + _dot(tl.trans(c), p.to(dtype), PRECISION)
    else:
        s = _dot(q, tl.trans(c), PRECISION) + _dot(qp, tl.trans(kpe), PRECISION)   # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s * SCALE, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(dtype), c, PRECISION)
    return m_new, l, acc


@triton.jit
def decode_kernel(q_lat_ptr, q_pe_ptr, pages_ptr, page_table_ptr, slots_ptr, lengths_ptr, o_ptr, lse_ptr,
                  out_ptr, count_ptr, prof_ptr,
                  SCALE: tl.constexpr, H: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SWAP: tl.constexpr = False,
                  REG_PREFETCH: tl.constexpr = False, COMBINE: tl.constexpr = False, PROFILE: tl.constexpr = False):
    """One program per (head block, request b, split sp of the context); see the module docstring.

    BLOCK_H: heads per program (a power of 2 >= 16; heads past H are masked). Every head block reads the
    request's latents, so BLOCK_H >= H reads them once per request and split.
    BLOCK_N: tokens per step (a power of 2 >= 16). When it divides PAGE_SIZE a block lies in one page (one page
    id per block); otherwise each row looks up its own page id (any page size; ~60 more registers).
    SWAP: the products run with the tokens (BLOCK_N) and the latent columns (R) as the M dimension of the
    tensor-core op and the heads as N: s^T = c q^T [BLOCK_N, BLOCK_H], acc^T += c^T p^T [R, BLOCK_H]. Hopper's
    wgmma needs M >= 64 per warpgroup, which 16 or 32 heads are not, and its A/B operands may come from
    shared memory, so the queries need not sit in registers. Same arithmetic as SWAP=False.
    REG_PREFETCH (BLOCK_N dividing PAGE_SIZE; launch with num_stages=1): the loop loads block i + 1 into
    registers before block i's products (software pipelining by hand: ordinary global loads, waited for only
    at their use in the next iteration), instead of Triton's pipeliner (async copies to shared buffers,
    num_stages - 1 of them). For the swapped form at 64-token blocks, whose three shared buffers do not fit.
    COMBINE (NUM_SPLITS > 1): the splits are merged in this launch, not by gpu.combine_splits afterwards. After
    writing its (o, lse), each program increments the counter count[b, head block] (int32, zero at launch;
    acquire-release at GPU scope, after a barrier so that the whole program's stores precede it); the program
    that sees NUM_SPLITS - 1 is the last of its request and head block: it reads the NUM_SPLITS partials back
    (from L2: .cg loads) and writes the merged rows to out [B, H, R] float32 (same formula as combine_splits:
    weights exp(lse_s - max_s lse_s), 0 where every split is empty). Without COMBINE, out and count are unused.
    The request's slot, length and first page id are loaded before the queries: otherwise the queries' load,
    conversion and shared-memory store come first (its barrier orders the later loads after it) and the chain
    slot -> page table -> first block starts only after them (bench_notes_mla.md, session 6).
    PROFILE (GPU only: inline PTX, not in the interpreter): the program writes prof[program] = int32 words (start
    ns low, high, end ns low, high, SM id, then four phases in ns since its start: queries in registers, first
    page id in registers, first block's products done, last block's products done), program = (hb * B + b) *
    NUM_SPLITS + sp (%globaltimer at entry and after its last store; each phase's timer read takes a value of
    that phase as an operand, so it waits for it).
    scripts/bench_mla.py --profile reads them: spread of starts and ends, program times, the phases.
    """
    hb = tl.program_id(0)           # head blocks of one request are launched together: with BLOCK_H < H
    b = tl.program_id(1)            # their reads of the same latents meet in L2
    sp = tl.program_id(2)
    if PROFILE:                     # the start stored at once (nothing more lives across the loop)
        t0 = _globaltimer()
        prog = ((hb * tl.num_programs(1) + b) * NUM_SPLITS + sp).to(tl.int64) * PROFILE_WORDS
        tl.store(prof_ptr + prog, (t0 & 0xFFFFFFFF).to(tl.int32))     # int32 words: JAX may run without x64
        tl.store(prof_ptr + prog + 1, (t0 >> 32).to(tl.int32))
    D: tl.constexpr = R + ROPE
    # the chain slot -> page table -> first block first, then the queries' loads
    length, table, start, stop, first = _split_run(slots_ptr, lengths_ptr, page_table_ptr, b, sp, MAX_PAGES,
                                                   NUM_SPLITS, BLOCK_N, PAGE_SIZE)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    offs_r = tl.arange(0, R)
    offs_p = tl.arange(0, ROPE)
    offs_n = tl.arange(0, BLOCK_N)
    dtype = pages_ptr.dtype.element_ty
    qrow = (b * H + heads).to(tl.int64)
    if SWAP:
        q = tl.load(q_lat_ptr + qrow[None, :] * R + offs_r[:, None], mask=hmask[None, :], other=0.0)    # [R, BH]
        qp = tl.load(q_pe_ptr + qrow[None, :] * ROPE + offs_p[:, None], mask=hmask[None, :], other=0.0)
    else:
        q = tl.load(q_lat_ptr + qrow[:, None] * R + offs_r[None, :], mask=hmask[:, None], other=0.0)    # [BH, R]
        qp = tl.load(q_pe_ptr + qrow[:, None] * ROPE + offs_p[None, :], mask=hmask[:, None], other=0.0)
    q = q.to(dtype)
    qp = qp.to(dtype)
    if PROFILE:                     # (the page id's timer is read after the queries' one)
        t_q = _globaltimer_after(tl.sum(tl.sum(q.to(tl.float32), 1), 0) + tl.sum(tl.sum(qp.to(tl.float32), 1), 0))
        t_table = _globaltimer_after(first)
        t_first = t_table

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    if SWAP:
        acc = tl.zeros([R, BLOCK_H], tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, R], tl.float32)
    off_c = offs_n[:, None] * D + offs_r[None, :]      # int32 offsets in a block (one page): fewer registers
    off_pe = offs_n[:, None] * D + offs_p[None, :]
    if REG_PREFETCH:
        tl.static_assert(PAGE_SIZE % BLOCK_N == 0, "REG_PREFETCH: BLOCK_N must divide PAGE_SIZE")
        page = first.to(tl.int64)
        nxt = tl.load(table + ((start + 1) * BLOCK_N // PAGE_SIZE), mask=start + 1 < stop, other=0)
        blk_ptr = pages_ptr + (page * PAGE_SIZE + (start * BLOCK_N) % PAGE_SIZE) * D
        valid_n = (start * BLOCK_N + offs_n < length) & (start < stop)
        c_n = tl.load(blk_ptr + off_c, mask=valid_n[:, None], other=0.0)                   # block `start`
        kpe_n = tl.load(blk_ptr + R + off_pe, mask=valid_n[:, None], other=0.0)
        for blk in range(start, stop):
            c = c_n
            kpe = kpe_n
            valid = blk * BLOCK_N + offs_n < length
            valid_n = ((blk + 1) * BLOCK_N + offs_n < length) & (blk + 1 < stop)           # block blk + 1
            blk_ptr = pages_ptr + (nxt.to(tl.int64) * PAGE_SIZE + ((blk + 1) * BLOCK_N) % PAGE_SIZE) * D
            c_n = tl.load(blk_ptr + off_c, mask=valid_n[:, None], other=0.0)
            kpe_n = tl.load(blk_ptr + R + off_pe, mask=valid_n[:, None], other=0.0)
            nxt = tl.load(table + ((blk + 2) * BLOCK_N // PAGE_SIZE), mask=blk + 2 < stop, other=0)
            m, l, acc = _block(c, kpe, q, qp, valid, m, l, acc, SCALE, PRECISION, SWAP)
    else:
        nxt = first
        for blk in range(start, stop):
            pos = blk * BLOCK_N + offs_n
            valid = pos < length
            if PAGE_SIZE % BLOCK_N == 0:                # the block lies in one page: one id (fewer registers),
                page = nxt.to(tl.int64)                 # loaded one block ahead (not a pipeline stage)
                nxt = tl.load(table + ((blk + 1) * BLOCK_N // PAGE_SIZE), mask=blk + 1 < stop, other=0)
                blk_ptr = pages_ptr + (page * PAGE_SIZE + (blk * BLOCK_N) % PAGE_SIZE) * D
                c = tl.load(blk_ptr + off_c, mask=valid[:, None], other=0.0)              # [BLOCK_N, R]
                kpe = tl.load(blk_ptr + R + off_pe, mask=valid[:, None], other=0.0)       # [BLOCK_N, ROPE]
            else:                                       # the block spans pages: an id per row
                page = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
                row = page * PAGE_SIZE + pos % PAGE_SIZE
                base = pages_ptr + row[:, None] * D
                c = tl.load(base + offs_r[None, :], mask=valid[:, None], other=0.0)        # [BLOCK_N, R]
                kpe = tl.load(base + R + offs_p[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, ROPE]
            m, l, acc = _block(c, kpe, q, qp, valid, m, l, acc, SCALE, PRECISION, SWAP)
            if PROFILE:
                if blk == start:
                    t_first = _globaltimer_after(tl.max(tl.max(acc, 1), 0))
    if PROFILE:
        t_loop = _globaltimer_after(tl.max(tl.max(acc, 1), 0))

    nonempty = l > 0
    inv = 1.0 / tl.where(nonempty, l, 1.0)
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    row_o = ((b * NUM_SPLITS + sp) * H + heads).to(tl.int64)
    o_dtype = o_ptr.dtype.element_ty                    # float32, or the pages' dtype (gpu.Config.low_partials)
    if SWAP:
        tl.store(o_ptr + row_o[None, :] * R + offs_r[:, None], (acc * inv[None, :]).to(o_dtype), mask=hmask[None, :])
    else:
        tl.store(o_ptr + row_o[:, None] * R + offs_r[None, :], (acc * inv[:, None]).to(o_dtype), mask=hmask[:, None])
    tl.store(lse_ptr + row_o, lse, mask=hmask)
    if COMBINE:
        tl.debug_barrier()                              # every thread's stores above, before the release
        seen = tl.atomic_add(count_ptr + b * ((H + BLOCK_H - 1) // BLOCK_H) + hb, 1, sem="acq_rel", scope="gpu")
        if seen == NUM_SPLITS - 1:                      # the other splits of (b, hb) have written theirs
            _combine(o_ptr, lse_ptr, out_ptr, b, hb, H, R, NUM_SPLITS, BLOCK_H)
    if PROFILE:
        t1 = _globaltimer()
        smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        prog = ((hb * tl.num_programs(1) + b) * NUM_SPLITS + sp).to(tl.int64) * PROFILE_WORDS
        tl.store(prof_ptr + prog + 2, (t1 & 0xFFFFFFFF).to(tl.int32))
        tl.store(prof_ptr + prog + 3, (t1 >> 32).to(tl.int32))
        tl.store(prof_ptr + prog + 4, smid)
        tl.store(prof_ptr + prog + 5, (t_q - t0).to(tl.int32))
        tl.store(prof_ptr + prog + 6, (t_table - t0).to(tl.int32))
        tl.store(prof_ptr + prog + 7, (t_first - t0).to(tl.int32))
        tl.store(prof_ptr + prog + 8, (t_loop - t0).to(tl.int32))


PROFILE_WORDS: tl.constexpr = tl.constexpr(9)     # int32 words per program of decode_kernel's PROFILE record


@triton.jit
def _split_run(slots_ptr, lengths_ptr, page_table_ptr, b, sp, MAX_PAGES: tl.constexpr, NUM_SPLITS: tl.constexpr,
               BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Request b's length (0 for a padding row), page-table row, this split's blocks [start, stop) and the page
    id of its first block (0 if it has none)."""
    slot = tl.load(slots_ptr + b)
    length = tl.load(lengths_ptr + b)
    length = tl.where(slot >= 0, length, 0)
    slot = tl.maximum(slot, 0)
    table = page_table_ptr + slot.to(tl.int64) * MAX_PAGES
    n_blocks = tl.cdiv(length, BLOCK_N)
    per_split = tl.cdiv(n_blocks, NUM_SPLITS)
    start = sp * per_split
    stop = tl.minimum(start + per_split, n_blocks)
    first = tl.load(table + (start * BLOCK_N // PAGE_SIZE), mask=start < stop, other=0)
    return length, table, start, stop, first


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _globaltimer_after(x):
    """%globaltimer read once the 32-bit scalar x is in a register (an operand of the asm, unused by it)."""
    x = x.to(tl.int32, bitcast=True)
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _combine(o_ptr, lse_ptr, out_ptr, b, hb, H: tl.constexpr, R: tl.constexpr,
             NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[b, heads] = sum_s w_s o[b, s, heads] / sum_s w_s, w_s = exp(lse_s - max_s lse_s) (COMBINE), in
    column chunks of at most 128 (a [BLOCK_H, 128] float32 sum: no spills next to the kernel's registers)."""
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)       # recomputed here: nothing more lives across the main loop
    hmask = heads < H
    top = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for sp in range(NUM_SPLITS):
        row = ((b * NUM_SPLITS + sp) * H + heads).to(tl.int64)
        top = tl.maximum(top, tl.load(lse_ptr + row, mask=hmask, other=float("-inf"), cache_modifier=".cg"))
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_H], tl.float32)
    for sp in range(NUM_SPLITS):
        row = ((b * NUM_SPLITS + sp) * H + heads).to(tl.int64)
        total += tl.exp(tl.load(lse_ptr + row, mask=hmask, other=float("-inf"), cache_modifier=".cg") - top)
    inv = 1.0 / tl.where(total > 0, total, 1.0)
    RC: tl.constexpr = 128 if R > 128 else R
    offs_c = tl.arange(0, RC)
    for c0 in tl.static_range(0, R, RC):
        res = tl.zeros([BLOCK_H, RC], tl.float32)
        for sp in range(NUM_SPLITS):
            row = ((b * NUM_SPLITS + sp) * H + heads).to(tl.int64)
            w = tl.exp(tl.load(lse_ptr + row, mask=hmask, other=float("-inf"), cache_modifier=".cg") - top) * inv
            part = tl.load(o_ptr + row[:, None] * R + c0 + offs_c[None, :], mask=hmask[:, None], other=0.0,
                           cache_modifier=".cg")
            res += w[:, None] * part
        tl.store(out_ptr + (b * H + heads).to(tl.int64)[:, None] * R + c0 + offs_c[None, :], res,
                 mask=hmask[:, None])


@triton.jit
def _stream(q, qp, pages_ptr, table, length, start, stop, m, l, acc, off_c, off_pe, offs_n,
            SCALE: tl.constexpr, R: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
            PRECISION: tl.constexpr):
    """Blocks [start, stop) of one request (BLOCK_N dividing PAGE_SIZE): decode_kernel's loop (page id one block
    ahead), online softmax into (m, l, acc)."""
    nxt = tl.load(table + (start * BLOCK_N // PAGE_SIZE), mask=start < stop, other=0)
    for blk in range(start, stop):
        valid = blk * BLOCK_N + offs_n < length
        page = nxt.to(tl.int64)
        nxt = tl.load(table + ((blk + 1) * BLOCK_N // PAGE_SIZE), mask=blk + 1 < stop, other=0)
        blk_ptr = pages_ptr + (page * PAGE_SIZE + (blk * BLOCK_N) % PAGE_SIZE) * D
        c = tl.load(blk_ptr + off_c, mask=valid[:, None], other=0.0)
        kpe = tl.load(blk_ptr + R + off_pe, mask=valid[:, None], other=0.0)
        m, l, acc = _block(c, kpe, q, qp, valid, m, l, acc, SCALE, PRECISION, False)
    return m, l, acc


@triton.jit
def decode_stream_kernel(q_lat_ptr, q_pe_ptr, pages_ptr, page_table_ptr, slots_ptr, lengths_ptr,
                         out_ptr, part_o_ptr, part_lse_ptr, count_ptr,
                         SCALE: tl.constexpr, B: tl.constexpr, B_P2: tl.constexpr, H: tl.constexpr,
                         R: tl.constexpr, ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, P_P2: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Balanced ("stream-K") decode: the blocks of all requests, laid end to end (request 0's, then 1's, ...;
    BLOCK_N-token blocks, padding rows and empty requests hold none), are cut into P = num_programs equal runs
    [p T / P, (p + 1) T / P) of the T blocks, one per program, whatever the requests' lengths; a run may cross
    request boundaries. One head block (BLOCK_H >= H); BLOCK_N divides PAGE_SIZE.

    A program walks its run one request segment at a time. A segment holding a whole request writes
    out[b] itself. Only a run's first and last segments can hold part of a request: they go to the program's
    partial slots part_o / part_lse[p, 0] (its first segment) and [p, 1] (its last), then the program counts
    itself in count[b] (atomic, acquire-release, after a barrier; zeroed at launch); the one that sees the
    number of non-empty runs over b minus 1 merges their partials into out[b] (weights exp(lse - max lse)).
    out is zeroed at launch: padding rows and empty requests stay 0. Same math as decode_kernel + combine.
    """
    p = tl.program_id(0)
    P = tl.num_programs(0)
    D: tl.constexpr = R + ROPE
    T = _locate(slots_ptr, lengths_ptr, 0, B, B_P2, BLOCK_N)[3]
    lo = ((p.to(tl.int64) * T) // P).to(tl.int32)
    hi = (((p + 1).to(tl.int64) * T) // P).to(tl.int32)
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < H
    offs_r = tl.arange(0, R)
    offs_p = tl.arange(0, ROPE)
    offs_n = tl.arange(0, BLOCK_N)
    dtype = pages_ptr.dtype.element_ty
    off_c = offs_n[:, None] * D + offs_r[None, :]
    off_pe = offs_n[:, None] * D + offs_p[None, :]
    pos = lo
    while pos < hi:
        b, start_b, end_b, _ = _locate(slots_ptr, lengths_ptr, pos, B, B_P2, BLOCK_N)
        slot = tl.load(slots_ptr + b)
        length = tl.load(lengths_ptr + b)
        table = page_table_ptr + slot.to(tl.int64) * MAX_PAGES
        qrow = (b * H + heads).to(tl.int64)
        q = tl.load(q_lat_ptr + qrow[:, None] * R + offs_r[None, :], mask=hmask[:, None], other=0.0).to(dtype)
        qp = tl.load(q_pe_ptr + qrow[:, None] * ROPE + offs_p[None, :], mask=hmask[:, None], other=0.0).to(dtype)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, R], tl.float32)
        m, l, acc = _stream(q, qp, pages_ptr, table, length, pos - start_b, tl.minimum(hi, end_b) - start_b,
                            m, l, acc, off_c, off_pe, offs_n, SCALE, R, D, PAGE_SIZE, BLOCK_N, PRECISION)
        # after the loop, the run's bookkeeping again from memory (fewer registers live across the loop)
        b, start_b, end_b, T = _locate(slots_ptr, lengths_ptr, pos, B, B_P2, BLOCK_N)
        lo = ((p.to(tl.int64) * T) // P).to(tl.int32)
        hi = (((p + 1).to(tl.int64) * T) // P).to(tl.int32)
        seg_hi = tl.minimum(hi, end_b)
        qrow = (b * H + heads).to(tl.int64)
        inv = 1.0 / tl.where(l > 0, l, 1.0)
        if (pos == start_b) & (seg_hi == end_b):                     # the whole request: the result
            tl.store(out_ptr + qrow[:, None] * R + offs_r[None, :], acc * inv[:, None], mask=hmask[:, None])
        else:
            part = (p * 2 + tl.where(pos == lo, 0, 1)).to(tl.int64)
            prow = part * H + heads
            tl.store(part_o_ptr + prow[:, None] * R + offs_r[None, :], acc * inv[:, None], mask=hmask[:, None])
            tl.store(part_lse_ptr + prow, tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf")),
                     mask=hmask)
            # the runs over b: programs first_p..last_p (those holding b's first and last blocks), less any
            # empty run between them (T < P)
            T64 = T.to(tl.int64)
            first_p = (((start_b + 1).to(tl.int64) * P + T64 - 1) // T64 - 1).to(tl.int32)
            last_p = ((end_b.to(tl.int64) * P + T64 - 1) // T64 - 1).to(tl.int32)
            qs = tl.arange(0, P_P2)
            runs = ((qs >= first_p) & (qs <= last_p)
                    & (((qs + 1).to(tl.int64) * T64) // P > (qs.to(tl.int64) * T64) // P)).to(tl.int32)
            tl.debug_barrier()
            seen = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")
            if seen == tl.sum(runs, 0) - 1:
                _merge_runs(part_o_ptr, part_lse_ptr, out_ptr, b, start_b, first_p, last_p, T64, P, H, R, BLOCK_H)
        pos = seg_hi


@triton.jit
def _locate(slots_ptr, lengths_ptr, pos, B: tl.constexpr, B_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """(b, its first block, its end block, T): the request holding block `pos` of the batch's blocks laid end to
    end (padding rows and empty requests hold none) and the total T (decode_stream_kernel)."""
    offs_b = tl.arange(0, B_P2)
    bmask = offs_b < B
    sl = tl.load(slots_ptr + offs_b, mask=bmask, other=-1)
    ln = tl.load(lengths_ptr + offs_b, mask=bmask, other=0)
    nb = tl.where(bmask & (sl >= 0), tl.cdiv(ln, BLOCK_N), 0)
    cum = tl.cumsum(nb, 0)                                          # inclusive: request b ends at block cum[b]
    b = tl.sum(((cum <= pos) & bmask).to(tl.int32), 0)
    end_b = tl.sum(tl.where(offs_b == b, cum, 0), 0)
    start_b = end_b - tl.sum(tl.where(offs_b == b, nb, 0), 0)
    return b, start_b, end_b, tl.sum(nb, 0)


@triton.jit
def _merge_runs(part_o_ptr, part_lse_ptr, out_ptr, b, start_b, first_p, last_p, T, P, H: tl.constexpr,
                R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[b] from the partials of runs first_p..last_p (decode_stream_kernel): run first_p holds b in its slot 1
    unless its run starts at b's first block; the others in slot 0; empty runs are skipped."""
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < H
    top = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for q in range(first_p, last_p + 1):
        live = ((q + 1) * T) // P > (q * T) // P
        part = q * 2 + tl.where((q == first_p) & ((q * T) // P < start_b), 1, 0)
        top = tl.maximum(top, tl.load(part_lse_ptr + part * H + heads, mask=hmask & live, other=float("-inf"),
                                      cache_modifier=".cg"))
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_H], tl.float32)
    for q in range(first_p, last_p + 1):
        live = ((q + 1) * T) // P > (q * T) // P
        part = q * 2 + tl.where((q == first_p) & ((q * T) // P < start_b), 1, 0)
        total += tl.exp(tl.load(part_lse_ptr + part * H + heads, mask=hmask & live, other=float("-inf"),
                                cache_modifier=".cg") - top)
    inv = 1.0 / tl.where(total > 0, total, 1.0)
    RC: tl.constexpr = 128 if R > 128 else R
    offs_c = tl.arange(0, RC)
    for c0 in tl.static_range(0, R, RC):
        res = tl.zeros([BLOCK_H, RC], tl.float32)
        for q in range(first_p, last_p + 1):
            live = ((q + 1) * T) // P > (q * T) // P
            part = q * 2 + tl.where((q == first_p) & ((q * T) // P < start_b), 1, 0)
            prow = part * H + heads
            w = tl.exp(tl.load(part_lse_ptr + prow, mask=hmask & live, other=float("-inf"),
                               cache_modifier=".cg") - top) * inv
            res += w[:, None] * tl.load(part_o_ptr + prow[:, None] * R + c0 + offs_c[None, :],
                                        mask=hmask[:, None] & live, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + (b * H + heads).to(tl.int64)[:, None] * R + c0 + offs_c[None, :], res,
                 mask=hmask[:, None])


# ---------------------------------------------------------------------------------------------------------
# Prefill (lingjax/kernels/mla/gpu_prefill.py calls it). Separate from decode_kernel above.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def prefill_kernel(q_lat_ptr, q_pe_ptr, pages_ptr, page_table_ptr, rows_ptr, positions_ptr, o_ptr,
                   T: tl.constexpr, SCALE: tl.constexpr, H: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr,
                   ROPE_P: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Causal absorbed MLA over the paged latents for a packed ragged batch of T query tokens.

    One program per (block of BLOCK_T consecutive tokens of the packed batch, block of BLOCK_H heads, block
    of BLOCK_R value columns). Its M = BLOCK_T * BLOCK_H query rows (token-major) share the keys of a page-
    table row (MQA), so they form the M side of every product. Token t reads the latent rows of page-table
    row rows[t] (-1: padding, output 0) at positions [0, positions[t]].

    The tokens of a block may belong to several rows (a request boundary inside the block, one-token
    requests, padding): the block is processed one row ("segment") at a time, lowest row first; a segment
    walks that row's keys from position 0 to the largest position among its tokens, in blocks of BLOCK_N
    positions (each key's page is looked up on its own, so BLOCK_N need not divide PAGE_SIZE), and only the
    segment's query rows take part in the softmax update (the others keep their max / sum / accumulator:
    their scores are -inf, their rescale factor 1). Nothing outside the block's rows' positions is loaded:
    rows past a segment's last position and unused page-table entries are masked, so unwritten rows (even
    NaN) never reach a product. Scores use all R + ROPE columns; the accumulator only this program's
    BLOCK_R value columns (BLOCK_R < R recomputes the scores per value block, for a smaller accumulator).
    ROPE_P: ROPE rounded up to a power of two >= 16 (the extra columns are loaded as zeros).
    Queries are cast to the pages' dtype for the products, probabilities to it for the second one (bf16
    tensor cores for a bf16 cache); max, sum and accumulator are float32. o: [T, H, R] float32.
    """
    tb = tl.num_programs(0) - 1 - tl.program_id(0)          # the last token blocks (most keys) start first
    hb = tl.program_id(1)
    rb = tl.program_id(2)
    M: tl.constexpr = BLOCK_T * BLOCK_H
    D: tl.constexpr = R + ROPE
    offs_m = tl.arange(0, M)
    tok = tb * BLOCK_T + offs_m // BLOCK_H
    head = hb * BLOCK_H + offs_m % BLOCK_H
    live = (tok < T) & (head < H)
    row = tl.load(rows_ptr + tok, mask=live, other=-1)
    pos = tl.load(positions_ptr + tok, mask=live, other=0)
    row = tl.where(live, row, -1)
    qrow = (tok.to(tl.int64) * H + head)
    offs_r = tl.arange(0, R)
    offs_p = tl.arange(0, ROPE_P)
    offs_v = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    dtype = pages_ptr.dtype.element_ty
    q = tl.load(q_lat_ptr + qrow[:, None] * R + offs_r[None, :], mask=live[:, None], other=0.0).to(dtype)
    qp = tl.load(q_pe_ptr + qrow[:, None] * ROPE + offs_p[None, :],
                 mask=live[:, None] & (offs_p[None, :] < ROPE), other=0.0).to(dtype)

    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_R], tl.float32)
    BIG: tl.constexpr = 2147483647
    done = row < 0
    cur = tl.min(tl.where(done, BIG, row), 0)
    while cur < BIG:
        seg = row == cur
        last = tl.max(tl.where(seg, pos, -1), 0)
        table = page_table_ptr + cur.to(tl.int64) * MAX_PAGES
        for first in range(0, last + 1, BLOCK_N):
            kpos = first + offs_n
            kin = kpos <= last
            page = tl.load(table + kpos // PAGE_SIZE, mask=kin, other=0).to(tl.int64)
            base = pages_ptr + (page * PAGE_SIZE + kpos % PAGE_SIZE)[:, None] * D
            c = tl.load(base + offs_r[None, :], mask=kin[:, None], other=0.0)                  # [BLOCK_N, R]
            kpe = tl.load(base + R + offs_p[None, :], mask=kin[:, None] & (offs_p[None, :] < ROPE), other=0.0)
            s = _dot(q, tl.trans(c), PRECISION) + _dot(qp, tl.trans(kpe), PRECISION)           # [M, BLOCK_N]
            valid = seg[:, None] & (kpos[None, :] <= pos[:, None])
            s = tl.where(valid, s * SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no key yet: exp(-inf) = 0
            p = tl.exp(s - shift[:, None])
            alpha = tl.exp(m - shift)
            l = l * alpha + tl.sum(p, 1)
            if BLOCK_R == R:
                v = c
            else:
                v = tl.load(base + offs_v[None, :], mask=kin[:, None], other=0.0)             # [BLOCK_N, BLOCK_R]
            acc = acc * alpha[:, None] + _dot(p.to(dtype), v, PRECISION)
            m = m_new
        done = done | seg
        cur = tl.min(tl.where(done, BIG, row), 0)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + qrow[:, None] * R + offs_v[None, :], out, mask=live[:, None])
