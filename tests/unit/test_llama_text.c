/* test_llama_text.c — unit tests of the llama engine's text release (src/engine/llama/llama_text.c)
 * and sampler (src/engine/llama/llama_sample.c), which need no llama.cpp.
 *
 * Text: a character split across tokens is released with the token that completes it, never
 * half; invalid bytes become U+FFFD at once, an unfinished character at the end too; stop strings
 * spanning tokens, starting inside a token, completed after carried context; and the migration
 * property, on thousands of random token streams (multi-byte characters cut anywhere, invalid
 * bytes, stop strings): a filter restarted at any release point with the released text as context
 * releases exactly what the uninterrupted filter released after that point.
 * Sampler: greedy argmax (lowest id on ties), non-finite logits refused, top_k 1 = argmax, the
 * draw a pure function of (seed, position), and sampled frequencies that follow the softmax. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/llama/llama_sample.h"
#include "engine/llama/llama_text.h"

static void take_out(bt_lltext *t, uint32_t *ids, size_t *n, bt_buf *text) {
    for (size_t i = 0; i < t->out_n; i++) ids[(*n)++] = t->out[i];
    if (t->out_text.len) assert_int_equal(bt_buf_append(text, t->out_text.data, t->out_text.len), BT_OK);
    t->out_n = 0;
    bt_buf_reset(&t->out_text);
}

static void test_utf8_split(void **state) {
    (void)state;
    bt_lltext t;
    assert_int_equal(bt_lltext_init(&t, NULL, 0), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 10, "caf", 3), BT_OK);
    assert_int_equal(t.out_n, 1);
    assert_int_equal(bt_lltext_push(&t, 11, "\xC3", 1), BT_OK); /* first byte of é */
    assert_int_equal(t.out_n, 1);                                /* held: half a character */
    assert_int_equal(bt_lltext_push(&t, 12, "\xA9!", 2), BT_OK);
    assert_int_equal(t.out_n, 3);
    assert_int_equal(t.out[1], 11);
    assert_int_equal(t.out[2], 12);
    assert_int_equal(t.out_text.len, 6);
    assert_memory_equal(t.out_text.data, "caf\xC3\xA9!", 6);
    /* a 4-byte character over three tokens */
    assert_int_equal(bt_lltext_push(&t, 13, "\xF0\x9F", 2), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 14, "\x98", 1), BT_OK);
    assert_int_equal(t.out_n, 3);
    assert_int_equal(bt_lltext_push(&t, 15, "\x80", 1), BT_OK);
    assert_int_equal(t.out_n, 6);
    assert_memory_equal(t.out_text.data + 6, "\xF0\x9F\x98\x80", 4);
    bt_lltext_free(&t);
}

static void test_utf8_invalid(void **state) {
    (void)state;
    bt_lltext t;
    assert_int_equal(bt_lltext_init(&t, NULL, 0), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 1, "\x80", 1), BT_OK); /* lone continuation byte */
    assert_int_equal(t.out_n, 1);
    assert_memory_equal(t.out_text.data, "\xEF\xBF\xBD", 3);
    assert_int_equal(bt_lltext_push(&t, 2, "\xE2\x82", 2), BT_OK); /* start of € ... */
    assert_int_equal(t.out_n, 1);
    assert_int_equal(bt_lltext_push(&t, 3, "A", 1), BT_OK); /* ... broken by 'A' */
    assert_int_equal(t.out_n, 3);
    assert_memory_equal(t.out_text.data + 3, "\xEF\xBF\xBD\xEF\xBF\xBD" "A", 7);
    assert_int_equal(bt_lltext_push(&t, 4, "\xC3", 1), BT_OK);
    assert_int_equal(t.out_n, 3);
    assert_int_equal(bt_lltext_finish(&t), BT_OK); /* unfinished at the end */
    assert_int_equal(t.out_n, 4);
    assert_int_equal(t.out_text.len, 13);
    assert_memory_equal(t.out_text.data + 10, "\xEF\xBF\xBD", 3);
    bt_lltext_free(&t);
    /* overlong and surrogate forms are invalid */
    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_lltext_decode_all("\xC0\xAF\xED\xA0\x80", 5, &b), BT_OK);
    assert_int_equal(b.len, 15);
    bt_buf_free(&b);
}

static void test_stop(void **state) {
    (void)state;
    const char *stop[] = {"park", "END"};
    bt_lltext t;
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 1, " in the p", 9), BT_OK);
    assert_int_equal(t.out_n, 0); /* " in the " could still be fine, but the token ends in "p" */
    assert_int_equal(bt_lltext_push(&t, 2, "ar", 2), BT_OK);
    assert_false(t.stopped);
    assert_int_equal(bt_lltext_push(&t, 3, "k.", 2), BT_OK);
    assert_true(t.stopped);
    assert_int_equal(t.out_n, 1); /* only the token in which the stop string begins */
    assert_int_equal(t.out_text.len, 8);
    assert_memory_equal(t.out_text.data, " in the ", 8);
    bt_lltext_free(&t);

    /* a partial match that does not complete is released */
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 1, "EN", 2), BT_OK);
    assert_int_equal(t.out_n, 0);
    assert_int_equal(bt_lltext_push(&t, 2, "ough", 4), BT_OK);
    assert_int_equal(t.out_n, 2);
    assert_memory_equal(t.out_text.data, "ENough", 6);
    bt_lltext_free(&t);

    /* carried context: "EN" was delivered before a migration, "D" completes the stop string */
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    assert_int_equal(bt_lltext_context(&t, "THE EN", 6), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 7, "D and", 5), BT_OK);
    assert_true(t.stopped);
    assert_int_equal(t.out_n, 0);
    bt_lltext_free(&t);
}

/* Random pieces: ASCII, whole and cut multi-byte characters, now and then an invalid byte. */
static size_t rand_piece(char *p) {
    static const char *chars[] = {"a", "b", " ", "\n", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "EN", "D"};
    size_t n = 0;
    int parts = 1 + rand() % 3;
    for (int i = 0; i < parts; i++) {
        if (rand() % 40 == 0) {
            p[n++] = (char)(0x80 + rand() % 0x7f);
            continue;
        }
        const char *c = chars[rand() % 9];
        size_t l = strlen(c);
        memcpy(p + n, c, l);
        n += l;
    }
    /* cut the piece anywhere: the rest starts the next one */
    return n;
}

static void test_migration_property(void **state) {
    (void)state;
    srand(1234);
    int seams = 0;
    for (int iter = 0; iter < 3000; iter++) {
        enum { NT = 60 };
        char raw[NT * 16];
        size_t off[NT + 1];
        size_t len = 0;
        for (int i = 0; i < NT; i++) len += rand_piece(raw + len);
        /* cut the byte string into NT pieces at random points (splitting characters) */
        off[0] = 0;
        off[NT] = len;
        for (int i = 1; i < NT; i++) off[i] = (size_t)rand() % (len + 1);
        for (int i = 1; i < NT; i++) /* sort */
            for (int j = i; j > 1 && off[j - 1] > off[j]; j--) {
                size_t x = off[j];
                off[j] = off[j - 1];
                off[j - 1] = x;
            }
        const char *stop[] = {"END", "\xC3\xA9\xC3\xA9"};
        int nstop = iter % 2 ? 2 : 0;

        /* the uninterrupted stream; remember each release point (all pending released) */
        bt_lltext a;
        assert_int_equal(bt_lltext_init(&a, stop, nstop), BT_OK);
        uint32_t ids[NT];
        size_t nids = 0;
        bt_buf text;
        bt_buf_init(&text, 1 << 20);
        size_t rel_ids[NT + 1], rel_text[NT + 1];
        int nrel = 0;
        for (int i = 0; i < NT && !a.stopped; i++) {
            assert_int_equal(bt_lltext_push(&a, (uint32_t)i, raw + off[i], off[i + 1] - off[i]), BT_OK);
            take_out(&a, ids, &nids, &text);
            if (!a.stopped && nids == (size_t)i + 1) { /* nothing held: a migration may cut here */
                rel_ids[nrel] = nids;
                rel_text[nrel++] = text.len;
            }
        }
        if (!a.stopped) assert_int_equal(bt_lltext_finish(&a), BT_OK);
        take_out(&a, ids, &nids, &text);
        if (!nrel) {
            bt_lltext_free(&a);
            bt_buf_free(&text);
            continue;
        }

        /* restart at one release point, with the released text as context */
        int r = rand() % nrel;
        size_t m = rel_ids[r];
        bt_lltext b;
        assert_int_equal(bt_lltext_init(&b, stop, nstop), BT_OK);
        bt_buf ctx;
        bt_buf_init(&ctx, 1 << 20);
        assert_int_equal(bt_lltext_decode_all(raw, off[m], &ctx), BT_OK);
        assert_int_equal(ctx.len, rel_text[r]); /* the carried ids decode to the released text */
        assert_memory_equal(ctx.data, text.data, ctx.len);
        assert_int_equal(bt_lltext_context(&b, ctx.data, ctx.len), BT_OK);
        uint32_t ids2[NT];
        size_t nids2 = 0;
        bt_buf text2;
        bt_buf_init(&text2, 1 << 20);
        for (size_t i = m; i < NT && !b.stopped; i++) {
            assert_int_equal(bt_lltext_push(&b, (uint32_t)i, raw + off[i], off[i + 1] - off[i]), BT_OK);
            take_out(&b, ids2, &nids2, &text2);
        }
        if (!b.stopped) assert_int_equal(bt_lltext_finish(&b), BT_OK);
        take_out(&b, ids2, &nids2, &text2);
        assert_int_equal(a.stopped, b.stopped);
        assert_int_equal(nids2, nids - m);
        assert_memory_equal(ids2, ids + m, nids2 * sizeof *ids2);
        assert_int_equal(text2.len, text.len - rel_text[r]);
        assert_memory_equal(text2.data, text.data + rel_text[r], text2.len);
        seams++;
        bt_lltext_free(&a);
        bt_lltext_free(&b);
        bt_buf_free(&text);
        bt_buf_free(&text2);
        bt_buf_free(&ctx);
    }
    fprintf(stderr, "migration property: %d seams checked\n", seams);
    assert_true(seams > 2000);
}

static void test_sampler(void **state) {
    (void)state;
    bt_llsample_cand cand[8];
    uint32_t counts[8] = {0};
    float l[8] = {0.5f, 2.0f, -1.0f, 2.0f, 0.0f, 1.0f, -3.0f, 0.25f};
    bt_llsample_params greedy = {.temperature = 0, .top_p = 1, .top_k = 0, .seed = 7};
    assert_int_equal(bt_llsample(l, 8, &greedy, NULL, 0, cand, counts), 1); /* lowest id among the maxima */
    bt_llsample_params k1 = {.temperature = 1.5, .top_p = 1, .top_k = 1, .seed = 7};
    for (uint64_t n = 0; n < 50; n++) assert_int_equal(bt_llsample(l, 8, &k1, NULL, n, cand, counts), 1);
    float bad[3] = {0, NAN, 1};
    assert_int_equal(bt_llsample(bad, 3, &greedy, NULL, 0, cand, counts), -1);
    float inf[3] = {0, INFINITY, 1};
    assert_int_equal(bt_llsample(inf, 3, &k1, NULL, 0, cand, counts), -1);

    /* position-keyed: the same (seed, n) gives the same token whatever came before */
    bt_llsample_params t1 = {.temperature = 1.0, .top_p = 1, .top_k = 0, .seed = 42};
    int first[64];
    for (int n = 0; n < 64; n++) first[n] = bt_llsample(l, 8, &t1, NULL, (uint64_t)n, cand, counts);
    for (int n = 63; n >= 0; n--) assert_int_equal(bt_llsample(l, 8, &t1, NULL, (uint64_t)n, cand, counts), first[n]);
    bt_llsample_params other = {.temperature = 1.0, .top_p = 1, .top_k = 0, .seed = 43};
    int same = 0;
    for (int n = 0; n < 64; n++) same += bt_llsample(l, 8, &other, NULL, (uint64_t)n, cand, counts) == first[n];
    assert_true(same < 50); /* another seed draws differently */

    /* frequencies follow the softmax: two logits, p(1) = 1/(1+e^-1) ~ 0.731 */
    float two[2] = {0.0f, 1.0f};
    int ones = 0, draws = 20000;
    for (int n = 0; n < draws; n++) ones += bt_llsample(two, 2, &t1, NULL, (uint64_t)n, cand, counts) == 1;
    double p = (double)ones / draws;
    assert_true(p > 0.715 && p < 0.747);
    /* top_p 0.5 keeps only the most likely of the two */
    bt_llsample_params tp = {.temperature = 1.0, .top_p = 0.5, .top_k = 0, .seed = 42};
    for (int n = 0; n < 200; n++) assert_int_equal(bt_llsample(two, 2, &tp, NULL, (uint64_t)n, cand, counts), 1);
    /* top_p 0 is the smallest nucleus: only the most probable token, i.e. the greedy pick (lowest id
     * on ties: l has 2.0 at ids 1 and 3), for every seed, position and temperature */
    for (uint64_t seed = 0; seed < 8; seed++) {
        bt_llsample_params z = {.temperature = 2.0, .top_p = 0, .top_k = 0, .seed = seed};
        for (int n = 0; n < 200; n++) assert_int_equal(bt_llsample(l, 8, &z, NULL, (uint64_t)n, cand, counts), 1);
        bt_llsample_params z2 = {.temperature = 1.0, .top_p = 0, .top_k = 0, .seed = seed};
        for (int n = 0; n < 200; n++) assert_int_equal(bt_llsample(two, 2, &z2, NULL, (uint64_t)n, cand, counts), 1);
    }
    /* and the same draws at top_p 1 do vary, so the loop above checks something */
    bt_llsample_params full = {.temperature = 2.0, .top_p = 1, .top_k = 0, .seed = 5};
    int other_ids = 0;
    for (int n = 0; n < 200; n++) other_ids += bt_llsample(l, 8, &full, NULL, (uint64_t)n, cand, counts) != 1;
    assert_true(other_ids > 20);
}

/* logit_bias and the OpenAI penalties (llama_sample.h): exact values, greedy and sampled, counts
 * of the generated tokens only, and the bias that equals a penalty giving the same pick. */
static void test_sampler_adjust(void **state) {
    (void)state;
    bt_llsample_cand cand[8];
    uint32_t counts[8] = {0};
    float l[8] = {0.5f, 2.0f, -1.0f, 2.0f, 0.0f, 1.0f, -3.0f, 0.25f};
    /* a bias of +3 on id 6 (-3 + 3 = 0) is still below 2; +5.5 (2.5) makes it the argmax */
    bt_llsample_bias b6 = {6, 3};
    bt_llsample_params g = {.top_p = 1, .bias = &b6, .n_bias = 1};
    assert_int_equal(bt_llsample(l, 8, &g, NULL, 0, cand, counts), 1);
    b6.bias = 5.5;
    assert_int_equal(bt_llsample(l, 8, &g, NULL, 0, cand, counts), 6);
    /* -100 on the greedy pick: the tie partner (id 3) wins */
    bt_llsample_bias ban = {1, -100};
    bt_llsample_params gb = {.top_p = 1, .bias = &ban, .n_bias = 1};
    assert_int_equal(bt_llsample(l, 8, &gb, NULL, 0, cand, counts), 3);
    /* and at a temperature, +100 on id 6 is drawn at every position */
    b6.bias = 100;
    bt_llsample_params tb = {.temperature = 1, .top_p = 1, .seed = 9, .bias = &b6, .n_bias = 1};
    for (uint64_t n = 0; n < 100; n++) assert_int_equal(bt_llsample(l, 8, &tb, NULL, n, cand, counts), 6);

    /* penalties count generated tokens: ids 1 and 3 tie at 2.0; 1 generated once with presence 0.1
     * gives 3; a frequency penalty of 0.6 on [3, 3, 5]: 3 -> 0.8, 5 -> 0.4; 1 (2.0) wins */
    int32_t gen1[] = {1};
    bt_llsample_params pp = {.top_p = 1, .presence_penalty = 0.1};
    assert_int_equal(bt_llsample(l, 8, &pp, gen1, 1, cand, counts), 3);
    assert_int_equal(bt_llsample(l, 8, &pp, gen1, 0, cand, counts), 1); /* nothing generated yet */
    int32_t gen2[] = {3, 1, 3, 5};
    bt_llsample_params fp = {.top_p = 1, .frequency_penalty = 0.6};
    /* 1: 2.0 - 0.6 = 1.4; 3: 2.0 - 1.2 = 0.8; 5: 1.0 - 0.6 = 0.4: 1 still wins */
    assert_int_equal(bt_llsample(l, 8, &fp, gen2, 4, cand, counts), 1);
    fp.frequency_penalty = 1.1; /* 1: 0.9; 3: -0.2; 5: -0.1; 0 (0.5) ... 1 still */
    assert_int_equal(bt_llsample(l, 8, &fp, gen2, 4, cand, counts), 1);
    fp.presence_penalty = 1.6; /* 1: 2 - 1.1 - 1.6 = -0.7; 3, 5 lower; 0 (0.5) wins */
    assert_int_equal(bt_llsample(l, 8, &fp, gen2, 4, cand, counts), 0);
    for (int i = 0; i < 8; i++) assert_int_equal(counts[i], 0); /* left as it was given */
    /* a negative penalty favours repetition */
    int32_t gen3[] = {4};
    bt_llsample_params neg = {.top_p = 1, .frequency_penalty = -2, .presence_penalty = -0.5};
    assert_int_equal(bt_llsample(l, 8, &neg, gen3, 1, cand, counts), 4); /* 0 + 2.5 */

    /* a bias of -x is the penalty x exactly: the same pick for ties broken by one ulp */
    float near[3] = {1.0f, nextafterf(1.0f, 2.0f) - 0.7f + 0.7f, 0.3f};
    int32_t gen4[] = {0, 0};
    bt_llsample_params pen = {.top_p = 1, .frequency_penalty = 0.35, .presence_penalty = 0.3};
    bt_llsample_bias eq = {0, -(2 * 0.35 + 0.3)};
    bt_llsample_params as_bias = {.top_p = 1, .bias = &eq, .n_bias = 1};
    float shifted[3];
    for (int k = 0; k < 200; k++) {
        for (int i = 0; i < 3; i++) shifted[i] = near[i] + (float)k * 0.001f;
        shifted[2] = shifted[0] - 1.0f + (float)k * 0.0001f;
        int32_t a = bt_llsample(shifted, 3, &pen, gen4, 2, cand, counts);
        int32_t b = bt_llsample(shifted, 3, &as_bias, NULL, 2, cand, counts);
        assert_int_equal(a, b);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_split), cmocka_unit_test(test_utf8_invalid),
        cmocka_unit_test(test_stop),       cmocka_unit_test(test_migration_property),
        cmocka_unit_test(test_sampler),    cmocka_unit_test(test_sampler_adjust),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
