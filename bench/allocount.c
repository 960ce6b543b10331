/* Counts calls into CPython's allocator (PyMem_SetAllocator hooks over the three domains, each
 * passing through to the allocator it wraps, as tracemalloc does). Built by bench/cbuild.py
 * with the system C compiler for bench/profile_l7.py; loaded into a profiled agent by bench/profhook.py. No Python headers
 * needed: the struct and the two functions are CPython's stable C API (Include/cpython/pymem.h). */
#include <stddef.h>

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr);
} PyMemAllocatorEx;

extern void PyMem_GetAllocator(int domain, PyMemAllocatorEx *allocator);
extern void PyMem_SetAllocator(int domain, PyMemAllocatorEx *allocator);

#define NDOMAINS 3 /* PYMEM_DOMAIN_RAW, _MEM, _OBJ */
static PyMemAllocatorEx orig[NDOMAINS];
static unsigned long long calls[NDOMAINS], bytes[NDOMAINS];
static int installed;

/* The raw domain may be called without the GIL: atomic counters for all, they are cheap. */
#define COUNT(d, n)                                                  \
    do {                                                             \
        __atomic_fetch_add(&calls[d], 1, __ATOMIC_RELAXED);          \
        __atomic_fetch_add(&bytes[d], (n), __ATOMIC_RELAXED);        \
    } while (0)

static void *hook_malloc(void *ctx, size_t size) {
    int d = (int)(size_t)ctx;
    COUNT(d, size);
    return orig[d].malloc(orig[d].ctx, size);
}

static void *hook_calloc(void *ctx, size_t nelem, size_t elsize) {
    int d = (int)(size_t)ctx;
    COUNT(d, nelem * elsize);
    return orig[d].calloc(orig[d].ctx, nelem, elsize);
}

static void *hook_realloc(void *ctx, void *ptr, size_t new_size) {
    int d = (int)(size_t)ctx;
    COUNT(d, new_size);
    return orig[d].realloc(orig[d].ctx, ptr, new_size);
}

static void hook_free(void *ctx, void *ptr) {
    int d = (int)(size_t)ctx;
    orig[d].free(orig[d].ctx, ptr);
}

int allocount_install(void) {
    if (installed)
        return 0;
    for (int d = 0; d < NDOMAINS; d++) {
        PyMemAllocatorEx hook = {(void *)(size_t)d, hook_malloc, hook_calloc, hook_realloc, hook_free};
        PyMem_GetAllocator(d, &orig[d]);
        PyMem_SetAllocator(d, &hook);
    }
    installed = 1;
    return 1;
}

unsigned long long allocount_calls(int d) { return (d >= 0 && d < NDOMAINS) ? __atomic_load_n(&calls[d], __ATOMIC_RELAXED) : 0; }
unsigned long long allocount_bytes(int d) { return (d >= 0 && d < NDOMAINS) ? __atomic_load_n(&bytes[d], __ATOMIC_RELAXED) : 0; }
