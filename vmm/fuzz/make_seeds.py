#!/usr/bin/env python3
"""Test harness (host side): writes the hand-made seed corpora of vmm's fuzz
targets into seeds/TARGET/. Each seed is in its target's input format (see
the target's source: these encoders mirror its decoders), chosen to start
the fuzzer deep in the code: whole FUSE conversations, well-formed virtio
chains, session streams. Run it again after changing a target's format:

    python3 make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- fuse_parse: raw FUSE requests --------------------------------------


def fuse_request(opcode, args, unique=1, nodeid=1):
    return u32(40 + len(args)) + u32(opcode) + u64(unique) + u64(nodeid) + u32(1000) + u32(1000) + u32(42) + u32(0) + args


def fuse_parse_seeds():
    write("fuse_parse", "init", fuse_request(26, u32(7) + u32(37) + u32(1 << 20) + u32(0) + bytes(48)))
    write("fuse_parse", "lookup", fuse_request(1, b"src\0"))
    write("fuse_parse", "write", fuse_request(16, u64(3) + u64(4096) + u32(5) + u32(0) + u64(0) + u32(0) + u32(0) + b"hello", nodeid=9))
    write("fuse_parse", "rename2", fuse_request(45, u64(1) + u32(1) + u32(0) + b"a\0b\0"))
    write("fuse_parse", "batch_forget", fuse_request(42, u32(2) + u32(0) + u64(5) + u64(1) + u64(6) + u64(2)))
    setattr = u32(0x1 | 0x8 | 0x10 | 0x80) + u32(0) + u64(0) + u64(100) + u64(0) + u64(1) + u64(2) + u64(3)
    setattr += u32(4) + u32(5) + u32(6) + u32(0o644) + u32(0) + u32(1000) + u32(1000) + u32(0)
    write("fuse_parse", "setattr", fuse_request(4, setattr))
    write("fuse_parse", "create", fuse_request(35, u32(1) + u32(0o100644) + u32(0o22) + u32(0) + b"new.rs\0"))
    write("fuse_parse", "symlink", fuse_request(6, b"link\0../target\0"))


# --- fs_server: conversations ------------------------------------------
# Mirrors fuzz_targets/fs_server.rs: a setup byte, then requests, each
# [opcode index, node, room, arguments..., mangle].

OPCODES = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
           34, 35, 36, 38, 42, 43, 44, 45, 46, 50, 0, 7, 39, 51, 4096]
NAMES = ["src", "main.rs", "lib", "mod.rs", ".env", "key.pem", ".envrc", ".git", "config", "HEAD", "hooks",
         "objects", "refs", "hardlinked", "abs-link", "rel-link", "dir-link", "sub", "docs", "readme.md", "new", "x",
         ".", "..", "a/b", "pre-commit", "index", ".GIT", "Config", "commondir", "rebase-merge", "id_rsa", ".ssh",
         "packed-refs", "outside", "y", "HEAD.lock", "config.worktree", "info", "alternates"]
TARGETS = ["src/main.rs", "../outside", "/etc/passwd", "main.rs", "..", ".git/config", "../work/src",
           "sub/../../outside", "x", ".env", "hooks/pre-commit", "../../../../../../etc", "../shadow", "abs-link",
           "rel-link", ".git/hooks", "new/../..", "y", ".", "../src/main.rs"]
BIG_ROOM = 0x80


def name(n):
    return bytes([NAMES.index(n)])


def raw_name(s):
    b = s.encode()
    return bytes([len(NAMES) + len(b)]) + b


# Opcodes whose arguments the target takes as raw bytes after a length.
RAW_ARGS = {5, 17, 21, 22, 23, 24, 36, 38, 50, 0, 7, 39, 51, 4096}


def req(op, node=0, args=b"", room=BIG_ROOM):
    if op in RAW_ARGS:
        args = bytes([len(args)]) + args
    return bytes([OPCODES.index(op), node, room]) + args + b"\0"


class Conv:
    """Builds a conversation, keeping node and handle numbers as the
    target does (node 0 is the root; each new id is appended)."""

    def __init__(self, read_only=False):
        self.out = bytes([1 if read_only else 0])
        self.nodes = ["/"]
        self.handles = []

    def node(self, path):
        return self.nodes.index(path)

    def fh(self, h):
        return self.handles.index(h)

    def add(self, op, node="/", args=b"", room=BIG_ROOM):
        self.out += req(op, self.node(node), args, room)

    def init(self):
        self.add(26, args=b"\0" + bytes([37]) + u32(1 << 20) + u32(0x2000 | 0x400000))

    # ok=False: the server refuses it (no new node or handle).
    def lookup(self, parent, n, path, ok=True):
        self.add(1, parent, name(n))
        if ok and path not in self.nodes:
            self.nodes.append(path)

    def open(self, path, flags_sel, h, ok=True):
        self.add(14, path, bytes([flags_sel]))
        if ok:
            self.handles.append(h)

    def create(self, parent, n, path, h, flags_sel=2, ok=True):
        self.add(35, parent, bytes([flags_sel, 0]) + (name(n) if n in NAMES else raw_name(n)))
        if ok:
            self.nodes.append(path)
            self.handles.append(h)

    def read(self, path, h, size_sel=4, op=15):
        self.add(op, path, bytes([self.fh(h), 0, size_sel]))

    def write(self, path, h, data, offset=0):
        self.add(16, path, bytes([self.fh(h), offset, len(data)]) + data + b"\0")

    def release(self, path, h, op=18):
        self.add(op, path, bytes([self.fh(h)]))

    def opendir(self, path, h):
        self.add(27, path, b"\0")
        self.handles.append(h)


def fs_server_seeds():
    c = Conv()
    c.init()
    c.lookup("/", "src", "src")
    c.lookup("src", "main.rs", "src/main.rs")
    c.open("src/main.rs", 0, "main")
    c.read("src/main.rs", "main")
    c.release("src/main.rs", "main")
    write("fs_server", "read", c.out)

    c = Conv()
    c.init()
    c.lookup("/", "src", "src")
    c.create("src", "new", "src/new", "new")
    c.write("src/new", "new", b"hello world")
    # SETATTR: truncate through the handle (FATTR_SIZE | FATTR_FH).
    c.add(4, "src/new", bytes([0x48, 0, c.fh("new"), 3, 0, 0, 0, 0]) + u32(0))
    c.add(12, "src", bytes([c.node("src")]) + name("new") + name("x"))
    c.release("src/new", "new")
    c.add(10, "src", name("x"))
    write("fs_server", "write_rename_unlink", c.out)

    c = Conv()
    c.init()
    c.lookup("/", ".git", ".git")
    c.opendir("/", "root")
    c.read("/", "root", size_sel=4, op=44)
    c.read("/", "root", size_sel=2, op=28)
    c.release("/", "root", op=29)
    c.opendir(".git", "git")
    c.read(".git", "git", size_sel=5, op=44)
    write("fs_server", "listings", c.out)

    c = Conv()
    c.init()
    c.lookup("/", ".git", ".git")
    c.lookup(".git", "config", ".git/config")
    c.open(".git/config", 0, "config")
    c.read(".git/config", "config")
    c.open(".git/config", 2, "config-rw", ok=False)
    c.lookup(".git", "hooks", ".git/hooks")
    c.create(".git/hooks", "pre-commit", ".git/hooks/pre-commit", "hook", ok=False)
    c.lookup("/", ".env", ".env", ok=False)
    c.create("/", "key.pem", "key.pem", "pem", ok=False)
    write("fs_server", "policy", c.out)

    c = Conv()
    c.init()
    c.add(9, "/", bytes([1]) + name("y"))  # MKDIR y
    c.nodes.append("y")
    c.add(6, "y", name("x") + bytes([TARGETS.index("../src/main.rs")]))
    c.nodes.append("y/x")
    c.add(5, "y/x")  # READLINK
    c.add(6, "/", name("new") + bytes([TARGETS.index("../outside")]))
    c.add(9, "y", bytes([0]) + name(".git"))  # a guest-made .git: to the shadow
    c.add(1, "/", name("abs-link"))
    c.add(11, "/", name("y"))  # RMDIR (not empty)
    c.add(17)  # STATFS
    write("fs_server", "links_dirs", c.out)

    c = Conv()
    c.init()
    c.lookup("/", "src", "src")
    c.create("src", "a", "src/a", "a")
    c.out += b"\xff"  # the audit log fails
    c.write("src/a", "a", b"after")
    c.create("src", "b", "src/b", "b", ok=False)
    write("fs_server", "audit_fails", c.out)

    c = Conv(read_only=True)
    c.init()
    c.lookup("/", "src", "src")
    c.create("src", "new", "src/new", "new", ok=False)
    c.lookup("src", "main.rs", "src/main.rs")
    c.open("src/main.rs", 2, "rw", ok=False)
    write("fs_server", "read_only_share", c.out)


# --- session: control-channel streams -----------------------------------


def frame(t, body):
    return u32(len(body) + 1) + bytes([t]) + body


def put_str(s):
    b = s.encode()
    return u32(len(b)) + b


def session_seeds():
    open_body = u32(1) + u32(2) + put_str("sh") + put_str("-c") + u32(1) + put_str("X=a=b")
    open_body += put_str("/work") + put_str("agent") + b"\x01" + u16(50) + u16(132) + b"\x01"
    stream = frame(1, open_body) + frame(2, b"ls\n") + frame(3, b"") + frame(4, u16(10) + u16(20)) + frame(5, u32(2))
    write("session", "client", b"\x03" + stream)
    out = frame(16, u32(42)) + frame(17, b"hi\n") + frame(18, b"") + frame(19, u32(7)) + frame(21, "é".encode())
    write("session", "guest", b"\x07" + out)
    write("session", "console", b"\x00@@sbx:exit 7@@\n" + frame(20, u32(9)))
    write("session", "console_error", b"\x00[    1.0] @@sbx:error cannot%20exec%0A@@\n")


# --- block_request: well-laid requests ----------------------------------
# Mirrors fuzz_targets/block_request.rs: a setup byte (bit 0 read-only,
# then the disk size), then requests [shape, status length, kind, sector,
# (length, flip) per data buffer, a fill byte per buffer in memory].


def block_request_seeds():
    # shape: bits 0-2 header length (0: 16), 3 header writable, 4-5 data
    # buffers, 6 no status, 7 readable status.
    read2 = bytes([0x10, 0, 0, 1, 2, 0, 7, 0])  # T_IN, sector 1, 1024 bytes
    write1 = bytes([0x10, 0, 1, 3, 1, 0, 9, 0])  # T_OUT, sector 3, 512 bytes
    flush = bytes([0x00, 0, 2, 0, 0])
    get_id = bytes([0x10, 0, 3, 0, 10, 0, 0, 0])  # GET_ID into 20 bytes
    two = bytes([0x20, 0, 1, 0, 1, 0, 2, 0, 1, 5, 0])  # T_OUT from two buffers
    write("block_request", "read_write", bytes([2 << 1]) + read2 + write1 + read2)
    write("block_request", "flush_id", bytes([1 << 1]) + flush + get_id + two)
    write("block_request", "read_only", bytes([1 | 2 << 1]) + write1 + read2)


# --- virtio chains: one queue ------------------------------------------
# Mirrors src/lib.rs Ring::new: descriptor count, then (address u16,
# length u16, flags u8, next u8) each, head count, heads, index byte.

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt):
    return u16(addr) + u16(length) + bytes([flags, nxt])


def ring(descs, heads):
    return bytes([len(descs)]) + b"".join(descs) + bytes([len(heads)]) + bytes(heads) + b"\0"


def data_area(pieces):
    """Bytes for the data area: (offset, bytes) pieces."""
    end = max(o + len(b) for o, b in pieces)
    out = bytearray(end)
    for o, b in pieces:
        out[o:o + len(b)] = b
    return bytes(out)


def block_chains_seeds():
    # Read sector 1 into 512 bytes; write sector 2 from 512 bytes.
    r = ring([desc(0, 16, F_NEXT, 1), desc(0x100, 512, F_NEXT | F_WRITE, 2), desc(0x400, 1, F_WRITE, 0),
              desc(0x10, 16, F_NEXT, 4), desc(0x500, 512, F_NEXT, 5), desc(0x410, 1, F_WRITE, 0)], [0, 3])
    data = data_area([(0, u32(0) + u32(0) + u64(1)), (0x10, u32(1) + u32(0) + u64(2))])
    write("block_chains", "read_write", b"\0" + r + data)
    # The same read through an indirect table at 0x800.
    table = b"".join(u64(0x1000 + a) + u32(n) + u16(f) + u16(x)
                     for a, n, f, x in [(0, 16, F_NEXT, 1), (0x100, 512, F_NEXT | F_WRITE, 2), (0x400, 1, F_WRITE, 0)])
    r = ring([desc(0x800, 48, F_INDIRECT, 0)], [0])
    write("block_chains", "indirect", b"\0" + r + data_area([(0, u32(0) + u32(0) + u64(1)), (0x800, table)]))
    # A loop, and a head out of the table.
    r = ring([desc(0, 16, F_NEXT, 1), desc(0x100, 512, F_NEXT | F_WRITE, 0)], [0, 0xf3, 1])
    write("block_chains", "loop", b"\x01" + r + data_area([(0, u32(0) + u32(0) + u64(0))]))


EMPTY_RING = b"\0\0\0"


def fs_chains_seeds():
    init = fuse_request(26, u32(7) + u32(37) + u32(1 << 20) + u32(0) + bytes(48), unique=77)
    lookup = fuse_request(1, b"f\0", unique=78)
    read_dir = fuse_request(27, u32(0) + u32(0), unique=79)
    r = ring([desc(0, len(init), F_NEXT, 1), desc(0x400, 256, F_WRITE, 0),
              # A request split over two buffers, its reply over two.
              desc(0x100, 20, F_NEXT, 3), desc(0x114, len(lookup) - 20, F_NEXT, 4), desc(0x500, 64, F_NEXT | F_WRITE, 5),
              desc(0x540, 256, F_WRITE, 0),
              # Readable after writable: returned unused.
              desc(0x600, 64, F_NEXT | F_WRITE, 7), desc(0x200, len(read_dir), 0, 0),
              desc(0x200, len(read_dir), F_NEXT, 9), desc(0x700, 64, F_WRITE, 0)], [0, 2, 6, 8])
    data = data_area([(0, init), (0x100, lookup), (0x200, read_dir)])
    write("fs_chains", "requests", b"\0" + EMPTY_RING + r + data)
    # A FORGET on the high-priority queue, no room for a reply.
    forget = fuse_request(2, u64(1), unique=80, nodeid=2)
    write("fs_chains", "hiprio", b"\0" + ring([desc(0, len(forget), 0, 0)], [0]) + EMPTY_RING + data_area([(0, forget)]))


def net_chains_seeds():
    frames = bytes([2]) + u16(60) + u16(1514)
    rx = ring([desc(0x1000, 2048, F_WRITE, 0), desc(0x1800, 1024, F_NEXT | F_WRITE, 2), desc(0x1c00, 1024, F_WRITE, 0)],
              [0, 1])
    arp = bytes([0xff] * 6) + bytes([2, 0, 0, 0, 0, 0x15]) + bytes([8, 6, 0, 1, 8, 0, 6, 4, 0, 1]) + bytes(20)
    tx = ring([desc(0x3000, 10, F_NEXT, 1), desc(0x300a, 12 + len(arp) - 10, 0, 0), desc(0x3100, 9000, 0, 0)], [0, 2])
    write("net_chains", "arp", frames + rx + tx + data_area([(0x3000, bytes(12) + arp)]))


def vsock_hdr(op, src_port, dst_port, length=0, flags=0):
    return u64(3) + u64(2) + u32(src_port) + u32(dst_port) + u32(length) + u16(1) + u16(op) + u32(flags) + u32(65536) + u32(0)


def vsock_chains_seeds():
    clients = bytes([1, 5]) + b"\x03"  # one client writing 5 bytes; later 3 more
    rx = ring([desc(0x4000 + 0x1000 * i, 0x1000, F_WRITE, 0) for i in range(6)], list(range(6)))
    host = 0x4000_0000
    response = vsock_hdr(2, 1024, host)
    rw = vsock_hdr(5, 1024, host, 9) + b"hi client"
    shutdown = vsock_hdr(4, 1024, host, 0, 3)
    credit = vsock_hdr(7, 1024, host)
    data = data_area([(0, response), (0x100, rw), (0x200, shutdown), (0x300, credit)])
    tx = ring([desc(0, len(response), 0, 0), desc(0x100, len(rw), 0, 0), desc(0x300, len(credit), 0, 0)], [0, 1, 2])
    write("vsock_chains", "session", clients + rx + tx + data)
    tx = ring([desc(0, len(response), 0, 0), desc(0x100, len(rw), 0, 0), desc(0x200, len(shutdown), 0, 0)], [0, 1, 2])
    write("vsock_chains", "shutdown", clients + rx + tx + data)
    request = vsock_hdr(1, 1024, 5555)
    write("vsock_chains", "guest_connects", bytes([0, 0]) + rx + ring([desc(0, len(request), 0, 0)], [0])
          + data_area([(0, request)]))


if __name__ == "__main__":
    fs_chains_seeds()
    net_chains_seeds()
    vsock_chains_seeds()
    fuse_parse_seeds()
    fs_server_seeds()
    session_seeds()
    block_request_seeds()
    block_chains_seeds()
