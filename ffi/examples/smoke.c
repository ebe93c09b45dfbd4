/* A C caller of fusedreg's ABI on the CPU: checks that the generated header compiles as C99 and
 * that its structs match the library (scripts/python-ci.sh builds and runs it).
 *   cc -std=c99 -Wall -Wextra -Werror -I ffi/include ffi/examples/smoke.c -L DIR -lfusedreg_ffi */
#include <stdio.h>
#include <string.h>

#include "fusedreg.h"

int main(void) {
    if (fr_abi_version() != FR_ABI_VERSION) {
        fprintf(stderr, "ABI version %u, header %d\n", fr_abi_version(), FR_ABI_VERSION);
        return 1;
    }
    enum { ROWS = 3, COLS = 5 };
    float x[ROWS * COLS], r[ROWS * COLS], y[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; i++) {
        x[i] = (float)i;
        r[i] = 100.0f;
    }
    FrOptions o = fr_options_default();
    o.rows = ROWS;
    o.cols = COLS;
    o.p = 0.5;
    o.seed = 7;
    o.call = 1;
    FrExec cpu = {-1, NULL};
    FrTensor tx = {x, ROWS * COLS, FR_F32}, tr = {r, ROWS * COLS, FR_F32}, ty = {y, ROWS * COLS, FR_F32};
    if (fr_dropout_forward(&o, cpu, &tx, NULL, &tr, NULL, &ty, NULL, NULL) != FR_OK) {
        fprintf(stderr, "fr_dropout_forward: %s\n", fr_last_error());
        return 1;
    }
    int kept = 0;
    for (int i = 0; i < ROWS * COLS; i++) {
        /* y = r (dropped) or r + x / (1 - p) (kept) */
        if (y[i] == 100.0f + 2.0f * x[i] && x[i] != 0.0f) kept++;
        else if (y[i] != 100.0f && x[i] != 0.0f) {
            fprintf(stderr, "y[%d] = %g\n", i, y[i]);
            return 1;
        }
    }
    /* Bad input: a status and a message, no crash. */
    o.p = 2.0;
    FrStatus st = fr_dropout_forward(&o, cpu, &tx, NULL, &tr, NULL, &ty, NULL, NULL);
    if (st != FR_ERR_INVALID_ARGUMENT || strstr(fr_last_error(), "p = 2") == NULL) {
        fprintf(stderr, "expected an invalid-argument error, got %d: %s\n", st, fr_last_error());
        return 1;
    }
    /* The workspace query: dbias partials of a [ROWS, COLS] f32 backward (one f32 per column
     * per slab; a CPU call needs none but checks one it is given). */
    o.p = 0.5;
    int64_t ws_bytes = -1;
    if (fr_workspace_size(FR_OP_DROPOUT_BACKWARD, &o, FR_F32, &ws_bytes) != FR_OK ||
        ws_bytes != 4 * COLS) {
        fprintf(stderr, "fr_workspace_size: %lld bytes (%s)\n", (long long)ws_bytes, fr_last_error());
        return 1;
    }
    float dx[ROWS * COLS], db[COLS], ws[COLS]; /* float storage: 4-byte aligned, 16 with luck */
    FrTensor tdx = {dx, ROWS * COLS, FR_F32}, tdb = {db, COLS, FR_F32};
    FrTensor tws = {ws, ws_bytes - 1, FR_U8}; /* one byte short */
    st = fr_dropout_backward(&o, cpu, &tx, NULL, &tdx, &tdb, &tws);
    if (st != FR_ERR_SHAPE || strstr(fr_last_error(), "fr_workspace_size") == NULL) {
        fprintf(stderr, "expected a shape error naming the query, got %d: %s\n", st, fr_last_error());
        return 1;
    }
    printf("c smoke: ok (%d of %d elements kept at p = 0.5; error message: %s; workspace %lld bytes)\n",
           kept, ROWS * COLS - 1, fr_last_error(), (long long)ws_bytes);
    return 0;
}
