#!/usr/bin/env python3
"""Generate src/pvmexec/arch/_syscalls_x86_64.py from a Linux source (or headers) tree.

    python3 tools/gen_syscall_table.py LINUX_TREE > src/pvmexec/arch/_syscalls_x86_64.py

Reads arch/x86/entry/syscalls/syscall_64.tbl (numbers) and the prototypes in
include/linux/syscalls.h and arch/x86/include/asm/syscalls.h (argument names
and types). Prototypes newer than the tree passed in come from NEWER below.
Each argument gets a kind: "fd" (a descriptor: mode 2 lends the caller's),
"str" (a NUL-terminated string in the target), "ptr" (other target memory)
or "int".
"""
import os
import re
import sys

# Prototypes added after the headers the table was first generated from (6.1),
# up to 6.18, and x86-64 entry points whose prototypes live elsewhere.
NEWER = {
    "mmap": "unsigned long addr, unsigned long len, unsigned long prot, unsigned long flags, unsigned long fd, unsigned long off",
    "rt_sigreturn": "",
    "arch_prctl": "int option, unsigned long arg2",
    "clone": "unsigned long clone_flags, unsigned long newsp, int __user *parent_tidptr, int __user *child_tidptr, unsigned long tls",
    "uretprobe": "",
    "modify_ldt": "int func, void __user *ptr, unsigned long bytecount",
    "iopl": "unsigned int level",
    "cachestat": "unsigned int fd, struct cachestat_range __user *cstat_range, struct cachestat __user *cstat, unsigned int flags",
    "fchmodat2": "int dfd, const char __user *filename, umode_t mode, unsigned int flags",
    "map_shadow_stack": "unsigned long addr, unsigned long size, unsigned int flags",
    "futex_wake": "void __user *uaddr, unsigned long mask, int nr, unsigned int flags",
    "futex_wait": "void __user *uaddr, unsigned long val, unsigned long mask, unsigned int flags, struct __kernel_timespec __user *timeout, clockid_t clockid",
    "futex_requeue": "struct futex_waitv __user *waiters, unsigned int flags, int nr_wake, int nr_requeue",
    "statmount": "const struct mnt_id_req __user *req, struct statmount __user *buf, size_t bufsize, unsigned int flags",
    "listmount": "const struct mnt_id_req __user *req, u64 __user *mnt_ids, size_t nr_mnt_ids, unsigned int flags",
    "lsm_get_self_attr": "unsigned int attr, struct lsm_ctx __user *ctx, u32 __user *size, u32 flags",
    "lsm_set_self_attr": "unsigned int attr, struct lsm_ctx __user *ctx, u32 size, u32 flags",
    "lsm_list_modules": "u64 __user *ids, u32 __user *size, u32 flags",
    "mseal": "unsigned long start, size_t len, unsigned long flags",
    "setxattrat": "int dfd, const char __user *path, unsigned int at_flags, const char __user *name, const struct xattr_args __user *args, size_t size",
    "getxattrat": "int dfd, const char __user *path, unsigned int at_flags, const char __user *name, struct xattr_args __user *args, size_t size",
    "listxattrat": "int dfd, const char __user *path, unsigned int at_flags, char __user *list, size_t size",
    "removexattrat": "int dfd, const char __user *path, unsigned int at_flags, const char __user *name",
    "open_tree_attr": "int dfd, const char __user *path, unsigned int flags, struct mount_attr __user *uattr, size_t usize",
    "file_getattr": "int dfd, const char __user *filename, struct file_attr __user *attr, size_t usize, unsigned int at_flags",
    "file_setattr": "int dfd, const char __user *filename, struct file_attr __user *attr, size_t usize, unsigned int at_flags",
}

FD_NAME = re.compile(r"^(fd|fd_in|fd_out|in_fd|out_fd|oldfd|newfd|dfd|olddfd|newdfd|epfd|ufd|pidfd|"
                     r"kernel_fd|initrd_fd|from_dfd|to_dfd|mqdes|group_fd|fd1|fd2|ruleset_fd|fs_fd|"
                     r"mnt_fd|dirfd)$")
STR_NAME = re.compile(r"(name|path|file|special|dir|type|uargs|cmdline|description|callout|_info)")


# Descriptor numbers that name a slot or another process's descriptor, not an open file of ours.
NOT_A_DESCRIPTOR = {("pidfd_getfd", "fd"), ("dup2", "newfd"), ("dup3", "newfd")}


# `const char __user *` arguments that are buffers, not NUL-terminated strings.
CONST_CHAR_BUFFERS = {"buf", "u_msg_ptr"}


def kind(ctype, name):
    ctype = " ".join(ctype.split())
    if "*" in ctype or "__user" in ctype or ctype.endswith("_t") and "user" in ctype:
        if ctype == "const char __user *" and name not in CONST_CHAR_BUFFERS:
            return "str"                   # symlink's `old`, `new` too: not only names that say path
        if "char" in ctype and STR_NAME.search(name or "") and name not in ("buf", "list"):
            return "str"
        return "ptr"
    if ctype in ("cap_user_header_t", "cap_user_data_t", "const cap_user_data_t", "__sighandler_t"):
        return "ptr"
    if FD_NAME.match(name or ""):
        return "fd"
    return "int"


def split_args(text):
    text = " ".join(text.split())
    if text in ("", "void"):
        return []
    out = []
    for i, a in enumerate(text.split(",")):
        a = a.strip()
        m = re.match(r"^(.*?[\s\*])(\w+)$", a)
        if m and m.group(2) not in ("int", "long", "char", "size_t", "u32", "u64", "pid_t", "uid_t",
                                    "gid_t", "umode_t", "off_t", "loff_t", "key_serial_t",
                                    "rwf_t", "aio_context_t", "qid_t", "timer_t", "clockid_t"):
            ctype, name = m.group(1).strip(), m.group(2)
        else:
            ctype, name = a, "arg%d" % i
        out.append((name, kind(ctype, name)))
    return out


def prototypes(paths):
    protos = {}
    for p in paths:
        if not os.path.exists(p):
            continue
        src = open(p).read()
        for m in re.finditer(r"asmlinkage\s+long\s+sys_(\w+)\s*\(([^;]*?)\)\s*;", src, re.S):
            protos.setdefault(m.group(1), split_args(m.group(2)))
    return protos


def main():
    tree = sys.argv[1]
    protos = prototypes([os.path.join(tree, "include/linux/syscalls.h"),
                         os.path.join(tree, "arch/x86/include/asm/syscalls.h")])
    for name, args in NEWER.items():
        protos[name] = split_args(args)
    rows = []
    for line in open(os.path.join(tree, "arch/x86/entry/syscalls/syscall_64.tbl")):
        parts = line.split()
        if not parts or parts[0].startswith("#") or parts[1] == "x32":
            continue
        nr, name = int(parts[0]), parts[2]
        entry = parts[3][len("sys_"):] if len(parts) > 3 else None
        if entry is None or entry == "ni_syscall":
            args = None                      # not implemented on x86-64
        else:
            args = protos.get(entry, protos.get(name))
            if args is None:
                sys.exit("no prototype for %s (entry %s)" % (name, entry))
        if args:
            args = [(a, "int" if (name, a) in NOT_A_DESCRIPTOR else k) for a, k in args]
        rows.append((nr, name, args))
    print('"""x86-64 system calls: number -> (name, ((arg, kind), ...) or None if unimplemented).')
    print()
    print("Generated by tools/gen_syscall_table.py; do not edit by hand.")
    print('"""')
    print("TABLE = {")
    for nr, name, args in rows:
        print("    %d: (%r, %r)," % (nr, name, None if args is None else tuple(args)))
    print("}")


if __name__ == "__main__":
    main()
