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
    printf("c smoke: ok (%d of %d elements kept at p = 0.5; error message: %s)\n", kept,
           ROWS * COLS - 1, fr_last_error());
    return 0;
}
