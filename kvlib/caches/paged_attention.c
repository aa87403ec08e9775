/* Paged decode attention: one new query token per row, its keys and values read from their
   blocks where they lie, through the row's block table (what vLLM's paged_attention kernel does
   on a GPU, written plainly for a CPU). kvlib.PagedCache calls it for a decode step instead of
   gathering the blocks into one tensor; kvlib/caches/paged_kernel.py builds and loads it.

   q       (B, Hq, D)          the new token's queries, float32, contiguous
   K, V    (N, bs, Hk, D)      one layer's block storage: slot t of block b is K[b, t]
   tables  (B, n_blocks)       row b's blocks in order (int64; padding is never read)
   lens    (B,)                the tokens row b holds, the new one included (int64, >= 1)
   out     (B, Hq, D)          softmax(q . k / sqrt(D)) v over each row's lens[b] tokens

   HEAD_DIM (D) and GROUP (Hq / Hk, grouped-query attention) are compile-time constants, so the
   loops over them unroll and vectorize: kvlib builds one library per shape. The query heads of
   a group read each key once. Work is split over (row, key/value head) pairs, one per OpenMP
   task. Returns 0, or 1 if a scores buffer could not be allocated. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define D HEAD_DIM

int paged_decode_attention(const float *q, const float *K, const float *V,
                           const int64_t *tables, const int64_t *lens, float *out,
                           int64_t B, int64_t Hk, int64_t bs, int64_t n_blocks,
                           float scale, int threads) {
    const int64_t Hq = Hk * GROUP;
    int failed = 0;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t hk = 0; hk < Hk; hk++) {
            const int64_t len = lens[b];
            const int64_t *table = tables + b * n_blocks;
            float *scores = malloc(sizeof(float) * GROUP * len);  /* (GROUP, len) */
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            float qs[GROUP][D], acc[GROUP][D], top[GROUP], total[GROUP];
            for (int j = 0; j < GROUP; j++) {  /* the group's queries, scaled once */
                const float *qj = q + (b * Hq + hk * GROUP + j) * D;
                for (int d = 0; d < D; d++) qs[j][d] = qj[d] * scale;
                top[j] = -FLT_MAX, total[j] = 0.f;
            }
            /* 1. scores: every key of the row, block by block, against the group's queries */
            for (int64_t s0 = 0; s0 < len; s0 += bs) {
                const float *kb = K + (table[s0 / bs] * bs * Hk + hk) * D;  /* slot 0 */
                const int64_t end = len - s0 < bs ? len - s0 : bs;
                for (int64_t t = 0; t < end; t++) {
                    const float *k = kb + t * Hk * D;
                    for (int j = 0; j < GROUP; j++) {
                        float dot = 0.f;
                        #pragma omp simd reduction(+:dot)
                        for (int d = 0; d < D; d++) dot += qs[j][d] * k[d];
                        scores[j * len + s0 + t] = dot;
                        top[j] = dot > top[j] ? dot : top[j];
                    }
                }
            }
            /* 2. softmax weights, unnormalised: exp(score - max) */
            for (int j = 0; j < GROUP; j++) {
                float *row = scores + j * len, sum = 0.f;
                #pragma omp simd reduction(+:sum)
                for (int64_t s = 0; s < len; s++) {
                    row[s] = expf(row[s] - top[j]);
                    sum += row[s];
                }
                total[j] = sum;
                for (int d = 0; d < D; d++) acc[j][d] = 0.f;
            }
            /* 3. the weighted sum of the values, block by block, then / the weights' sum */
            for (int64_t s0 = 0; s0 < len; s0 += bs) {
                const float *vb = V + (table[s0 / bs] * bs * Hk + hk) * D;
                const int64_t end = len - s0 < bs ? len - s0 : bs;
                for (int64_t t = 0; t < end; t++) {
                    const float *v = vb + t * Hk * D;
                    for (int j = 0; j < GROUP; j++) {
                        const float p = scores[j * len + s0 + t];
                        #pragma omp simd
                        for (int d = 0; d < D; d++) acc[j][d] += p * v[d];
                    }
                }
            }
            for (int j = 0; j < GROUP; j++) {
                float *o = out + (b * Hq + hk * GROUP + j) * D;
                const float inv = 1.f / total[j];
                for (int d = 0; d < D; d++) o[d] = acc[j][d] * inv;
            }
            free(scores);
        }
    }
    return failed;
}
