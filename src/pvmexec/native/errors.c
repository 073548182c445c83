/* OSError naming the failing call: the one way the C core reports a kernel failure. */
#include "core.h"

PyObject *
raise_call(const char *call, long tid)
{
    int e = errno;
    char buf[96];
    snprintf(buf, sizeof buf, "%s(%ld)", call, tid);
    PyObject *args = Py_BuildValue("(iss)", e, strerror(e), buf);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

PyObject *
raise_host(const char *call)
{
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, call);
}
