/* The checkpoint image's page index read as runs: what a restore walks instead of one page at a time. */
#include "core.h"

#define PVM_PAGE 4096ULL
#define PVM_MARKERS 0xFFFFFFFFFFFFFFFEULL       /* ZERO and FROM_FILE: offsets at or above */
#define PVM_FROM_FILE PVM_MARKERS

struct entry {
    uint64_t addr, seq, off;
};

static int
by_addr_then_seq(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    if (x->addr != y->addr)
        return x->addr < y->addr ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* pages.idx as merged runs, sorted; e[k] = (addr, pages in .seq, off). NULL with an exception set. */
static struct entry *
read_runs(PyObject *idx, size_t *count)
{
    Py_buffer raw;
    if (PyObject_GetBuffer(idx, &raw, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t n = (size_t)raw.len / 16;
    struct entry *e = PyMem_RawMalloc(n ? n * sizeof *e : 1);
    if (e == NULL) {
        PyBuffer_Release(&raw);
        PyErr_NoMemory();
        return NULL;
    }
    const unsigned char *p = raw.buf;
    for (size_t i = 0; i < n; i++) {
        memcpy(&e[i].addr, p + 16 * i, 8);
        memcpy(&e[i].off, p + 16 * i + 8, 8);
        e[i].seq = i;
    }
    PyBuffer_Release(&raw);
    Py_BEGIN_ALLOW_THREADS
    qsort(e, n, sizeof *e, by_addr_then_seq);
    Py_END_ALLOW_THREADS
    size_t runs = 0;                            /* merged in place */
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n && e[i + 1].addr == e[i].addr)
            continue;                           /* a later pair for this address wins */
        if (runs) {
            struct entry *r = &e[runs - 1];
            int marker = r->off >= PVM_MARKERS;
            if (r->addr + r->seq * PVM_PAGE == e[i].addr &&
                (marker ? e[i].off == r->off : e[i].off < PVM_MARKERS && r->off + r->seq * PVM_PAGE == e[i].off)) {
                r->seq++;
                continue;
            }
        }
        e[runs].addr = e[i].addr;
        e[runs].off = e[i].off;
        e[runs].seq = 1;
        runs++;
    }
    *count = runs;
    return e;
}

/* index_runs(raw) -> bytes: pages.idx (u64 address, u64 offset pairs; the last pair for an address
 * wins) as u64 triples (address, offset, pages), sorted and merged: a run's pages follow each other
 * in memory and in pages.img, or all carry the same marker offset (ZERO, FROM_FILE). */
PyObject *
py_index_runs(PyObject *self, PyObject *args)
{
    PyObject *idx;
    size_t runs;
    if (!PyArg_ParseTuple(args, "O", &idx))
        return NULL;
    struct entry *e = read_runs(idx, &runs);
    if (e == NULL)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(runs * 24));
    if (out != NULL) {
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
        for (size_t k = 0; k < runs; k++) {
            memcpy(o + 24 * k, &e[k].addr, 8);
            memcpy(o + 24 * k + 8, &e[k].off, 8);
            memcpy(o + 24 * k + 16, &e[k].seq, 8);
        }
    }
    PyMem_RawFree(e);
    return out;
}

struct out {
    uint64_t *v;
    size_t n, cap;                              /* in triples */
};

static int
emit(struct out *o, uint64_t addr, uint64_t off, uint64_t pages)
{
    if (o->n) {                                 /* merge with the last when both follow on */
        uint64_t *l = o->v + 3 * (o->n - 1);
        if (l[0] + l[2] * PVM_PAGE == addr &&
            (l[1] >= PVM_MARKERS ? off == l[1] : off < PVM_MARKERS && l[1] + l[2] * PVM_PAGE == off)) {
            l[2] += pages;
            return 0;
        }
    }
    if (o->n == o->cap) {
        size_t cap = o->cap ? 2 * o->cap : 1024;
        uint64_t *v = PyMem_RawRealloc(o->v, cap * 3 * sizeof *v);
        if (v == NULL)
            return -1;
        o->v = v;
        o->cap = cap;
    }
    uint64_t *t = o->v + 3 * o->n++;
    t[0] = addr;
    t[1] = off;
    t[2] = pages;
    return 0;
}

enum { PLAN_NONE, PLAN_MEMORY, PLAN_FILE, PLAN_LAZY };

/*
 * index_plan(raw, maps, cut) -> (now, later): what a restore does with each page of pages.idx.
 * maps: sorted u64 triples (start, end, how) of the mappings, how one of NONE (the image's pages
 * are not used: special and shared-file mappings), MEMORY (pages with an offset are written),
 * FILE (and ZERO pages as zeros), LAZY (pages with an offset are left to the page server but for
 * those in cut, sorted u64 page addresses, which are written). now and later are u64 triples
 * (address, offset or ZERO, pages), sorted and merged. ValueError(address) for a page outside every
 * mapping or not page-aligned.
 */
PyObject *
py_index_plan(PyObject *self, PyObject *args)
{
    PyObject *idx;
    Py_buffer maps, cut;
    if (!PyArg_ParseTuple(args, "Oy*y*", &idx, &maps, &cut))
        return NULL;
    size_t runs, nmaps = (size_t)maps.len / 24, ncut = (size_t)cut.len / 8;
    const uint64_t *m = maps.buf, *c = cut.buf;
    struct out now = {0}, later = {0};
    PyObject *result = NULL;
    struct entry *e = read_runs(idx, &runs);
    if (e == NULL)
        goto done;
    size_t mi = 0, ci = 0;
    for (size_t k = 0; k < runs; k++) {
        uint64_t addr = e[k].addr, off = e[k].off, end = addr + e[k].seq * PVM_PAGE;
        if (addr % PVM_PAGE || (off < PVM_MARKERS && off % PVM_PAGE) || end < addr) {
            PyErr_Format(PyExc_ValueError, "%llu", (unsigned long long)addr);
            goto done;
        }
        while (addr < end) {
            while (mi < nmaps && m[3 * mi + 1] <= addr)
                mi++;
            if (mi == nmaps || m[3 * mi] > addr) {
                PyErr_Format(PyExc_ValueError, "%llu", (unsigned long long)addr);
                goto done;
            }
            uint64_t stop = end < m[3 * mi + 1] ? end : m[3 * mi + 1], how = m[3 * mi + 2];
            uint64_t pages = (stop - addr) / PVM_PAGE;
            int ok = 0;
            if (how == PLAN_MEMORY && off < PVM_MARKERS)
                ok = emit(&now, addr, off, pages);
            else if (how == PLAN_FILE && off != PVM_FROM_FILE)      /* that page is the file's own */
                ok = emit(&now, addr, off, pages);
            else if (how == PLAN_LAZY && off < PVM_MARKERS) {
                uint64_t a = addr, o = off;
                while (ci < ncut && c[ci] < a)
                    ci++;
                while (a < stop && ok == 0) {
                    if (ci < ncut && c[ci] == a) {                  /* written now */
                        ok = emit(&now, a, o, 1);
                        a += PVM_PAGE, o += PVM_PAGE, ci++;
                        continue;
                    }
                    uint64_t upto = ci < ncut && c[ci] < stop ? c[ci] : stop;
                    ok = emit(&later, a, o, (upto - a) / PVM_PAGE);
                    o += upto - a, a = upto;
                }
            }
            if (ok < 0) {
                PyErr_NoMemory();
                goto done;
            }
            if (off < PVM_MARKERS)
                off += stop - addr;
            addr = stop;
        }
    }
    result = Py_BuildValue("(y#y#)", (const char *)now.v, (Py_ssize_t)(now.n * 24),
                           (const char *)later.v, (Py_ssize_t)(later.n * 24));
done:
    PyMem_RawFree(e);
    PyMem_RawFree(now.v);
    PyMem_RawFree(later.v);
    PyBuffer_Release(&maps);
    PyBuffer_Release(&cut);
    return result;
}
