/* Row views and their overlap test, shared by the two Python bindings (module.c for
 * NumPy buffers, torch_binding.cpp for torch tensors).  Plain C, no Python. */
#ifndef NX_ROWS_H
#define NX_ROWS_H

#include <stddef.h>

/* Below this much work a kernel takes less time than handing the GIL over;
 * releasing it could also stall the caller behind another thread for a whole
 * switch interval. */
#define NX_NOGIL_MIN_WORK 16384

/* `rows` rows of `cols` contiguous elements, `rs` elements apart. */
typedef struct {
    char *base;
    size_t rows, cols;
    ptrdiff_t rs;
} rview;

/* Do two row views share any byte?  Exact for views with the same row stride
 * (q and k slices of one qkv tensor), conservative otherwise. */
static inline int nx_rows_overlap(const rview *a, const rview *b, size_t it)
{
    if (a->rows == 0 || b->rows == 0) return 0;
    const char *a0 = a->base, *a1 = a0 + ((a->rows - 1) * a->rs + a->cols) * it;
    const char *b0 = b->base, *b1 = b0 + ((b->rows - 1) * b->rs + b->cols) * it;
    if (a1 <= b0 || b1 <= a0) return 0;
    if (a->rs != b->rs || a->rows == 1 || b->rows == 1 || (a0 - b0) % (ptrdiff_t)it) return 1;
    ptrdiff_t rs = a->rs, d = ((b0 - a0) / (ptrdiff_t)it % rs + rs) % rs;
    return !(d >= (ptrdiff_t)a->cols && d + (ptrdiff_t)b->cols <= rs);
}

#endif
