"""Prefix cache for the hybrid model (issue 17): reuse MLA pages and linear-attention states across requests.

A prompt is cut into blocks of `page_size` tokens (block j = tokens [j * page_size, (j + 1) * page_size)).
The cache is a trie over whole blocks: a node is one block after its parent's prefix, compared by its
tokens (exact: no hash can collide). A node holds

  page        the MLA latent page of that block (one page id = that page in every MLA layer's pool,
              lingjax/paging.py), one reference of its own in the PageAllocator
  state_row   optionally, a row of the linear-attention pools holding every linear layer's float32 state
              after the node's last token (the engine's pools have `num_slots` request rows, then these)

A request can resume at node n only if n holds a state: the MLA pages alone cannot rebuild a linear
state. `lookup` walks the prompt's blocks (at most (len - 1) // page_size of them, so that at least one
token is computed and gives logits) and returns the walked path and the deepest node on it that holds a
state. The engine then shares the pages of the path up to that node (page references: nothing is
copied, and only whole pages are shared, so nothing is ever written into a shared page), copies the state
row into the request's slot, and prefills the rest.

Where states are saved (one row is `state_bytes` of memory, large next to a page, so not at every block):
near the end of each prompt, at the start of its last prefill chunk (a repeat of the same prompt, or a
longer one that extends it, resumes there and prefills at most one chunk), and at the point where a prompt
leaves the cached path, when that node has no state yet (the branch point of a shared system prompt: the
second request that shares it saves the state there, and every later one resumes from it). The engine
ends a prefill chunk at each such boundary so that the slot holds exactly that state after the step, and
copies it into a free row. The save near the end lies where a chunk ends anyway, so it costs no step
(when the engine's prefill_chunk is a multiple of page_size; otherwise it is the last whole block, one
step more); the branch-point save can cost one step for the request that makes it. The engine's
`prefix_cache_save_last=False` keeps only the branch-point saves.

Eviction, least recently used first, under two budgets: the page pool shared with running requests (the
engine evicts when it needs pages) and `num_rows` state rows (a new state evicts the least recently used
state). Only leaves of the trie whose nodes no running request pins are evicted. A running request pins
every node of the path it walked or inserted, so that an unpinned node has no pinned descendant and all
unpinned nodes can be evicted, leaf by leaf: `evictable` counts them, the engine counts them as free pages.

What requests read from the cache they never write: a request writes only its own slot and its own pages.
Score requests bypass the cache (their logits over the whole prompt are needed anyway).
"""
from __future__ import annotations

import heapq
import itertools

from lingjax.paging import PageAllocator


class Node:
    __slots__ = ("parent", "block", "children", "page", "state_row", "users", "last_used", "depth")

    def __init__(self, parent, block, page, depth):
        self.parent, self.block, self.page, self.depth = parent, block, page, depth
        self.children: dict[tuple, Node] = {}
        self.state_row: int | None = None
        self.users = 0                # running requests that pin this node
        self.last_used = 0


class PrefixCache:
    def __init__(self, page_size: int, pages: PageAllocator, state_rows: list[int]):
        self.page_size, self.pages = page_size, pages
        self.root = Node(None, (), -1, 0)
        self._free_rows = list(state_rows)
        self.num_rows = len(state_rows)
        self._clock = itertools.count(1)
        self.num_nodes = 0
        self.evicted = 0              # pages evicted so far
        self._pinned = 0              # nodes with users > 0
        self._with_state: dict[int, Node] = {}     # state row -> node

    # ------------------------------------------------------------------------- queries
    @property
    def evictable(self) -> int:
        """Pages the cache would give back if every unpinned node were evicted."""
        return self.num_nodes - self._pinned

    @property
    def rows_used(self) -> int:
        return len(self._with_state)

    def block(self, tokens, j: int) -> tuple:
        return tuple(tokens[j * self.page_size:(j + 1) * self.page_size])

    def lookup(self, tokens) -> tuple[list[Node], int]:
        """-> (path: the cached nodes of the prompt's first blocks, at most (len - 1) // page_size; hit: the
        number of leading blocks up to the deepest node on the path holding a state, 0 if none)."""
        node, path, hit = self.root, [], 0
        now = next(self._clock)
        for j in range((len(tokens) - 1) // self.page_size):
            node = node.children.get(self.block(tokens, j))
            if node is None:
                break
            node.last_used = now
            path.append(node)
            if node.state_row is not None:
                hit = j + 1
        return path, hit

    # ------------------------------------------------------------------------- pins
    def pin(self, node: Node) -> None:
        if node.users == 0:
            self._pinned += 1
        node.users += 1

    def unpin(self, node: Node) -> None:
        node.users -= 1
        if node.users == 0:
            self._pinned -= 1
            node.last_used = next(self._clock)

    # ------------------------------------------------------------------------- inserts
    def child(self, parent: Node, block: tuple) -> Node | None:
        return parent.children.get(block)

    def insert(self, parent: Node, block: tuple, page: int) -> Node:
        """A new node for `block` after `parent` holding `page` (one reference taken), pinned once (by the
        request inserting it). The block must not be cached after `parent` yet."""
        assert block not in parent.children and len(block) == self.page_size
        node = Node(parent, block, page, parent.depth + 1)
        self.pages.ref(page)
        parent.children[block] = node
        self.num_nodes += 1
        node.last_used = next(self._clock)
        self.pin(node)
        return node

    def take_row(self, node: Node) -> int | None:
        """A state row for `node` (free, else the least recently used node's state is dropped): the caller
        copies the state into it. None when the cache has no rows."""
        if node.state_row is not None or self.num_rows == 0:
            return None
        if not self._free_rows:
            old = min(self._with_state.values(), key=lambda n: n.last_used)
            self._drop_state(old)
        row = self._free_rows.pop()
        node.state_row = row
        self._with_state[row] = node
        return row

    def _drop_state(self, node: Node) -> None:
        del self._with_state[node.state_row]
        self._free_rows.append(node.state_row)
        node.state_row = None

    # ------------------------------------------------------------------------- eviction
    def evict(self, n_pages: int) -> int:
        """Evict unpinned leaves, least recently used first, until `n_pages` pages are free again (or no
        unpinned node is left) -> pages freed."""
        heap = [(nd.last_used, id(nd), nd) for nd in self._nodes() if nd.users == 0 and not nd.children]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n_pages:
            _, _, nd = heapq.heappop(heap)
            parent = nd.parent
            del parent.children[nd.block]
            if nd.state_row is not None:
                self._drop_state(nd)
            self.pages.unref(nd.page)
            self.num_nodes -= 1
            freed += 1
            self.evicted += 1
            if parent is not self.root and parent.users == 0 and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def clear(self) -> None:
        """Evict everything (no node may be pinned)."""
        self.evict(self.num_nodes)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            nd = stack.pop()
            yield nd
            stack.extend(nd.children.values())
