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
 * draw a pure function of (seed, position), and sampled frequencies that follow the softmax; and
 * every draw equal to the first implementation's (llsample_ref.h: a qsort of the vocabulary) on
 * random vocabularies of 1 to 32,000 tokens with exact ties, signed zeros, extreme magnitudes,
 * every kind of top_k, top_p, temperature, bias and penalty. */
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
#include "llsample_ref.h"

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

/* include_stop_str_in_output (keep): the text ends after the stop string; the token in which it
 * ends is released with the text through it, tokens after it not at all; a stop string begun in
 * carried text delivers only its rest. */
static void test_stop_kept(void **state) {
    (void)state;
    const char *stop[] = {"park", "END"};
    bt_lltext t;
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    t.stops.keep = true;
    assert_int_equal(bt_lltext_push(&t, 1, " in the p", 9), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 2, "ar", 2), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 3, "k.", 2), BT_OK);
    assert_true(t.stopped);
    assert_int_equal(t.out_n, 3);
    assert_int_equal(t.out_text.len, 12);
    assert_memory_equal(t.out_text.data, " in the park", 12);
    bt_lltext_free(&t);

    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    t.stops.keep = true;
    assert_int_equal(bt_lltext_context(&t, "THE EN", 6), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 7, "D and", 5), BT_OK);
    assert_true(t.stopped);
    assert_int_equal(t.out_n, 1);
    assert_int_equal(t.out_text.len, 1);
    assert_memory_equal(t.out_text.data, "D", 1);
    bt_lltext_free(&t);
}

/* min_tokens: the text of tokens numbered below it is final as it comes, a stop string in it kept;
 * a match that begins there and ends in a later token's text still stops; a continuation numbers
 * its first token after the carried ones. */
static void test_stop_min_tokens(void **state) {
    (void)state;
    const char *stop[] = {",", "END"};
    bt_lltext t;
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    bt_lltext_min_tokens(&t, 3, 0);
    assert_int_equal(bt_lltext_push(&t, 1, "a, b", 4), BT_OK); /* token 1 */
    assert_false(t.stopped);
    assert_int_equal(t.out_n, 1);
    assert_int_equal(bt_lltext_push(&t, 2, " E", 2), BT_OK); /* token 2: final though "E" could start END */
    assert_int_equal(t.out_n, 2);
    assert_int_equal(bt_lltext_push(&t, 3, "ND!", 3), BT_OK); /* token 3: "END" ends in it */
    assert_true(t.stopped);
    assert_int_equal(t.out_n, 2);
    assert_memory_equal(t.out_text.data, "a, b E", 6);
    bt_lltext_free(&t);

    /* a match wholly inside the text before min_tokens does not stop a later token */
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    bt_lltext_min_tokens(&t, 2, 0);
    assert_int_equal(bt_lltext_push(&t, 1, "x,", 2), BT_OK);
    assert_int_equal(bt_lltext_push(&t, 2, "y", 1), BT_OK);
    assert_false(t.stopped);
    assert_int_equal(bt_lltext_push(&t, 3, "z,", 2), BT_OK);
    assert_true(t.stopped);
    assert_memory_equal(t.out_text.data, "x,yz", 4);
    bt_lltext_free(&t);

    /* continued after 2 carried tokens: the first pushed is token 3, the last one held off */
    assert_int_equal(bt_lltext_init(&t, stop, 2), BT_OK);
    bt_lltext_min_tokens(&t, 4, 2);
    assert_int_equal(bt_lltext_push(&t, 3, "p,", 2), BT_OK);
    assert_false(t.stopped);
    assert_int_equal(bt_lltext_push(&t, 4, "q,", 2), BT_OK);
    assert_true(t.stopped);
    assert_int_equal(t.out_text.len, 3);
    assert_memory_equal(t.out_text.data, "p,q", 3);
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
    bt_llsample_scratch *s = bt_llsample_scratch_new(8);
    assert_non_null(s);
    float l[8] = {0.5f, 2.0f, -1.0f, 2.0f, 0.0f, 1.0f, -3.0f, 0.25f};
    bt_llsample_params greedy = {.temperature = 0, .top_p = 1, .top_k = 0, .seed = 7};
    assert_int_equal(bt_llsample(l, 8, &greedy, NULL, 0, s), 1); /* lowest id among the maxima */
    bt_llsample_params k1 = {.temperature = 1.5, .top_p = 1, .top_k = 1, .seed = 7};
    for (uint64_t n = 0; n < 50; n++) assert_int_equal(bt_llsample(l, 8, &k1, NULL, n, s), 1);
    float bad[3] = {0, NAN, 1};
    assert_int_equal(bt_llsample(bad, 3, &greedy, NULL, 0, s), -1);
    float inf[3] = {0, INFINITY, 1};
    assert_int_equal(bt_llsample(inf, 3, &k1, NULL, 0, s), -1);

    /* position-keyed: the same (seed, n) gives the same token whatever came before */
    bt_llsample_params t1 = {.temperature = 1.0, .top_p = 1, .top_k = 0, .seed = 42};
    int first[64];
    for (int n = 0; n < 64; n++) first[n] = bt_llsample(l, 8, &t1, NULL, (uint64_t)n, s);
    for (int n = 63; n >= 0; n--) assert_int_equal(bt_llsample(l, 8, &t1, NULL, (uint64_t)n, s), first[n]);
    bt_llsample_params other = {.temperature = 1.0, .top_p = 1, .top_k = 0, .seed = 43};
    int same = 0;
    for (int n = 0; n < 64; n++) same += bt_llsample(l, 8, &other, NULL, (uint64_t)n, s) == first[n];
    assert_true(same < 50); /* another seed draws differently */

    /* frequencies follow the softmax: two logits, p(1) = 1/(1+e^-1) ~ 0.731 */
    float two[2] = {0.0f, 1.0f};
    int ones = 0, draws = 20000;
    for (int n = 0; n < draws; n++) ones += bt_llsample(two, 2, &t1, NULL, (uint64_t)n, s) == 1;
    double p = (double)ones / draws;
    assert_true(p > 0.715 && p < 0.747);
    /* top_p 0.5 keeps only the most likely of the two */
    bt_llsample_params tp = {.temperature = 1.0, .top_p = 0.5, .top_k = 0, .seed = 42};
    for (int n = 0; n < 200; n++) assert_int_equal(bt_llsample(two, 2, &tp, NULL, (uint64_t)n, s), 1);
    /* top_p 0 is the smallest nucleus: only the most probable token, i.e. the greedy pick (lowest id
     * on ties: l has 2.0 at ids 1 and 3), for every seed, position and temperature */
    for (uint64_t seed = 0; seed < 8; seed++) {
        bt_llsample_params z = {.temperature = 2.0, .top_p = 0, .top_k = 0, .seed = seed};
        for (int n = 0; n < 200; n++) assert_int_equal(bt_llsample(l, 8, &z, NULL, (uint64_t)n, s), 1);
        bt_llsample_params z2 = {.temperature = 1.0, .top_p = 0, .top_k = 0, .seed = seed};
        for (int n = 0; n < 200; n++) assert_int_equal(bt_llsample(two, 2, &z2, NULL, (uint64_t)n, s), 1);
    }
    /* and the same draws at top_p 1 do vary, so the loop above checks something */
    bt_llsample_params full = {.temperature = 2.0, .top_p = 1, .top_k = 0, .seed = 5};
    int other_ids = 0;
    for (int n = 0; n < 200; n++) other_ids += bt_llsample(l, 8, &full, NULL, (uint64_t)n, s) != 1;
    assert_true(other_ids > 20);
    bt_llsample_scratch_free(s);
}

/* logit_bias and the OpenAI penalties (llama_sample.h): exact values, greedy and sampled, counts
 * of the generated tokens only, and the bias that equals a penalty giving the same pick. */
static void test_sampler_adjust(void **state) {
    (void)state;
    bt_llsample_scratch *s = bt_llsample_scratch_new(8);
    assert_non_null(s);
    float l[8] = {0.5f, 2.0f, -1.0f, 2.0f, 0.0f, 1.0f, -3.0f, 0.25f};
    /* a bias of +3 on id 6 (-3 + 3 = 0) is still below 2; +5.5 (2.5) makes it the argmax */
    bt_llsample_bias b6 = {6, 3};
    bt_llsample_params g = {.top_p = 1, .bias = &b6, .n_bias = 1};
    assert_int_equal(bt_llsample(l, 8, &g, NULL, 0, s), 1);
    b6.bias = 5.5;
    assert_int_equal(bt_llsample(l, 8, &g, NULL, 0, s), 6);
    /* -100 on the greedy pick: the tie partner (id 3) wins */
    bt_llsample_bias ban = {1, -100};
    bt_llsample_params gb = {.top_p = 1, .bias = &ban, .n_bias = 1};
    assert_int_equal(bt_llsample(l, 8, &gb, NULL, 0, s), 3);
    /* and at a temperature, +100 on id 6 is drawn at every position */
    b6.bias = 100;
    bt_llsample_params tb = {.temperature = 1, .top_p = 1, .seed = 9, .bias = &b6, .n_bias = 1};
    for (uint64_t n = 0; n < 100; n++) assert_int_equal(bt_llsample(l, 8, &tb, NULL, n, s), 6);

    /* penalties count generated tokens: ids 1 and 3 tie at 2.0; 1 generated once with presence 0.1
     * gives 3; a frequency penalty of 0.6 on [3, 3, 5]: 3 -> 0.8, 5 -> 0.4; 1 (2.0) wins */
    int32_t gen1[] = {1};
    bt_llsample_params pp = {.top_p = 1, .presence_penalty = 0.1};
    assert_int_equal(bt_llsample(l, 8, &pp, gen1, 1, s), 3);
    assert_int_equal(bt_llsample(l, 8, &pp, gen1, 0, s), 1); /* nothing generated yet */
    int32_t gen2[] = {3, 1, 3, 5};
    bt_llsample_params fp = {.top_p = 1, .frequency_penalty = 0.6};
    /* 1: 2.0 - 0.6 = 1.4; 3: 2.0 - 1.2 = 0.8; 5: 1.0 - 0.6 = 0.4: 1 still wins */
    assert_int_equal(bt_llsample(l, 8, &fp, gen2, 4, s), 1);
    fp.frequency_penalty = 1.1; /* 1: 0.9; 3: -0.2; 5: -0.1; 0 (0.5) ... 1 still */
    assert_int_equal(bt_llsample(l, 8, &fp, gen2, 4, s), 1);
    fp.presence_penalty = 1.6; /* 1: 2 - 1.1 - 1.6 = -0.7; 3, 5 lower; 0 (0.5) wins */
    assert_int_equal(bt_llsample(l, 8, &fp, gen2, 4, s), 0);
    for (int i = 0; i < 8; i++) assert_int_equal(s->counts[i], 0); /* left as it was given */
    /* a negative penalty favours repetition */
    int32_t gen3[] = {4};
    bt_llsample_params neg = {.top_p = 1, .frequency_penalty = -2, .presence_penalty = -0.5};
    assert_int_equal(bt_llsample(l, 8, &neg, gen3, 1, s), 4); /* 0 + 2.5 */

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
        int32_t a = bt_llsample(shifted, 3, &pen, gen4, 2, s);
        int32_t b = bt_llsample(shifted, 3, &as_bias, NULL, 2, s);
        assert_int_equal(a, b);
    }
    bt_llsample_scratch_free(s);
}

/* vLLM's repetition_penalty (the prompt's tokens and the generated ones, x / r above 0, x * r below),
 * min_p after temperature, and the end-of-generation ids excluded before min_tokens. */
static void test_sampler_vllm(void **state) {
    (void)state;
    bt_llsample_scratch *s = bt_llsample_scratch_new(8);
    assert_non_null(s);
    float l[8] = {0.5f, 2.0f, -1.0f, 1.9f, 0.0f, 1.0f, -3.0f, 0.25f};
    /* 1 in the prompt: 2.0 / 1.1 = 1.82 < 1.9, so 3 wins; a penalty of 0 or 1 is off */
    int32_t prompt[] = {1, 6};
    bt_llsample_params rp = {.top_p = 1, .repetition_penalty = 1.1, .prompt = prompt, .n_prompt = 2};
    assert_int_equal(bt_llsample(l, 8, &rp, NULL, 0, s), 3);
    rp.repetition_penalty = 1;
    assert_int_equal(bt_llsample(l, 8, &rp, NULL, 0, s), 1);
    /* generated too, and a negative logit is multiplied: -1 * 0.1 = -0.1 for id 2, below 0 (id 4) */
    int32_t gen[] = {3, 2};
    bt_llsample_params rg = {.top_p = 1, .repetition_penalty = 1.1, .prompt = prompt, .n_prompt = 2};
    assert_int_equal(bt_llsample(l, 8, &rg, gen, 2, s), 1); /* 1: 1.818..., 3: 1.727... */
    rg.repetition_penalty = 0.1; /* below 1 favours them: 1 -> 20, 2 -> -0.1 */
    assert_int_equal(bt_llsample(l, 8, &rg, gen, 2, s), 1);
    float neg[3] = {-1.0f, -0.5f, -0.2f};
    int32_t g2[] = {2};
    bt_llsample_params rn = {.top_p = 1, .repetition_penalty = 3};
    assert_int_equal(bt_llsample(neg, 3, &rn, g2, 1, s), 1); /* 2: -0.6 < -0.5 */
    for (int i = 0; i < 8; i++) assert_int_equal(s->counts[i], 0);
    /* min_p 1 keeps the most probable token only: every draw at a high temperature is the greedy one */
    bt_llsample_params mp = {.temperature = 2, .top_p = 1, .seed = 4, .min_p = 1};
    int other = 0;
    for (uint64_t n = 0; n < 200; n++) {
        assert_int_equal(bt_llsample(l, 8, &mp, NULL, n, s), 1);
        bt_llsample_params hot = {.temperature = 2, .top_p = 1, .seed = 4};
        other += bt_llsample(l, 8, &hot, NULL, n, s) != 1;
    }
    assert_true(other > 0);
    /* min_p 0.9 at temperature 1: exp(1.9 - 2.0) = 0.905 keeps 3 beside 1, nothing else */
    mp = (bt_llsample_params){.temperature = 1, .top_p = 1, .seed = 4, .min_p = 0.9};
    for (uint64_t n = 0; n < 200; n++) {
        int32_t t = bt_llsample(l, 8, &mp, NULL, n, s);
        assert_true(t == 1 || t == 3);
    }
    /* eog ids are excluded at draws before min_tokens, greedy or sampled */
    int32_t eog[] = {1, 3};
    bt_llsample_params mt = {.top_p = 1, .min_tokens = 2, .eog = eog, .n_eog = 2};
    assert_int_equal(bt_llsample(l, 8, &mt, NULL, 0, s), 5);
    assert_int_equal(bt_llsample(l, 8, &mt, NULL, 1, s), 5);
    assert_int_equal(bt_llsample(l, 8, &mt, NULL, 2, s), 1);
    mt.temperature = 1;
    for (uint64_t n = 0; n < 2; n++) {
        int32_t t = bt_llsample(l, 8, &mt, NULL, n, s);
        assert_true(t != 1 && t != 3);
    }
    bt_llsample_scratch_free(s);
}

static uint64_t rng_next(uint64_t *st) {
    uint64_t x = (*st += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static double rng_unit(uint64_t *st) { return (double)(rng_next(st) >> 11) * (1.0 / 9007199254740992.0); }

/* The kinds of logit vectors the order has to get right, tie order above all. */
enum { L_SPREAD, L_FEW, L_QUARTERS, L_ZEROS, L_MAGNITUDES, L_EQUAL, L_RISING, L_FALLING, L_KINDS };

static void fill_logits(float *l, int32_t n, int kind, uint64_t *st) {
    static const float few[] = {-3.5f, -1.0f, 0.0f, -0.0f, 0.25f, 2.0f, 2.0f, 7.0f};
    static const float tiny[] = {0.0f, -0.0f, 1e-45f, -1e-45f, 1.17549435e-38f, -1.17549435e-38f, 1e-30f, -1e-30f};
    for (int32_t i = 0; i < n; i++) {
        double u = rng_unit(st);
        switch (kind) {
        case L_SPREAD: l[i] = (float)(u * 40 - 20); break;
        case L_FEW: l[i] = few[rng_next(st) % 8]; break;
        case L_QUARTERS: l[i] = (float)floor(u * 64 - 32) / 4; break; /* many exact ties */
        case L_ZEROS: l[i] = u < 0.7 ? tiny[rng_next(st) % 8] : (float)(u * 4 - 2); break;
        case L_MAGNITUDES: { /* from 1e-38 to 3e38, either sign, ties among them */
            float m = (float)pow(10, floor(u * 76) - 38) * (rng_next(st) % 2 ? 1 : 3.4f);
            l[i] = rng_next(st) % 2 ? m : -m;
            break;
        }
        case L_EQUAL: l[i] = 1.5f; break;
        case L_RISING: l[i] = (float)i * 0.01f; break; /* each token the heap's new best */
        default: l[i] = -(float)i * 0.01f; break;
        }
    }
}

static void test_sampler_equals_reference(void **state) {
    (void)state;
    enum { MAX_V = 32000, MAX_GEN = 64 };
    bt_llsample_scratch *s = bt_llsample_scratch_new(MAX_V);
    bt_llsample_cand *ref_c = calloc(MAX_V, sizeof *ref_c);
    uint32_t *ref_counts = calloc(MAX_V, sizeof *ref_counts);
    float *l = calloc(MAX_V, sizeof *l);
    assert_true(s && ref_c && ref_counts && l);
    static const int32_t sizes[] = {1, 2, 100, 512, 32000};
    static const double temps[] = {0, 0.1, 1, 2};
    static const double top_ps[] = {0, 0.5, 0.9, 1};
    uint64_t st = 1;
    long draws = 0, not_greedy = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        int32_t v = sizes[si];
        /* top_k: off, 1, 40, either side of where a heap gives way to the radix sort (64 | 65 and
         * 500 | 501 at 32,000: llama_sample.c's select_pays), v - 1, v, beyond */
        int32_t top_ks[] = {0, 1, 40, 64, 65, 500, 501, v - 1, v, v + 7};
        /* every combination on the small vocabularies; a random tenth of them at 32,000, where the
         * reference's qsort takes milliseconds a draw */
        int reps = v >= 32000 ? 1 : 3;
        for (int kind = 0; kind < L_KINDS; kind++)
            for (int rep = 0; rep < reps; rep++) {
                fill_logits(l, v, kind, &st);
                for (size_t ki = 0; ki < sizeof top_ks / sizeof *top_ks; ki++)
                    for (size_t pi = 0; pi < sizeof top_ps / sizeof *top_ps; pi++)
                        for (size_t ti = 0; ti < sizeof temps / sizeof *temps; ti++)
                            for (int adj = 0; adj < 4; adj++) {
                                if (v >= 32000 && rng_next(&st) % 10) continue;
                                bt_llsample_bias bias[6];
                                int32_t gen[MAX_GEN];
                                bt_llsample_params p = {.temperature = temps[ti],
                                                        .top_p = top_ps[pi],
                                                        .top_k = top_ks[ki],
                                                        .seed = rng_next(&st)};
                                uint64_t n = rng_next(&st) % MAX_GEN;
                                for (uint64_t i = 0; i < n; i++) /* repeats, as generated text has */
                                    gen[i] = (int32_t)(rng_next(&st) % (uint64_t)(v < 8 ? v : 8 + v / 100));
                                if (adj & 1) { /* distinct ids; some biases tie a token with token 0 */
                                    int32_t nb = v < 6 ? v : 6;
                                    for (int32_t i = 0; i < nb; i++) {
                                        int32_t id = (int32_t)((uint64_t)i * (uint64_t)v / (uint64_t)nb);
                                        double b = rng_next(&st) % 3 ? rng_unit(&st) * 200 - 100
                                                                     : (double)l[0] - (double)l[id];
                                        bias[i] = (bt_llsample_bias){id, fabs(b) <= 100 ? b : 0};
                                    }
                                    p.bias = bias;
                                    p.n_bias = (size_t)nb;
                                }
                                if (adj & 2) {
                                    p.frequency_penalty = rng_unit(&st) * 4 - 2;
                                    p.presence_penalty = rng_next(&st) % 2 ? rng_unit(&st) * 4 - 2 : 0;
                                }
                                const int32_t *g = adj & 2 ? gen : NULL;
                                int32_t want = ref_llsample(l, v, &p, g, n, ref_c, ref_counts);
                                int32_t got = bt_llsample(l, v, &p, g, n, s);
                                if (got != want)
                                    fail_msg("v=%d kind=%d top_k=%d top_p=%g T=%g adj=%d n=%llu seed=%llu: got %d, "
                                             "the reference %d",
                                             (int)v, kind, (int)p.top_k, p.top_p, p.temperature, adj,
                                             (unsigned long long)n, (unsigned long long)p.seed, (int)got, (int)want);
                                draws++;
                                not_greedy += got != bt_llsample(l, v, &(bt_llsample_params){.top_p = 1}, NULL, 0, s);
                            }
            }
    }
    for (int32_t i = 0; i < MAX_V; i++) assert_int_equal(s->counts[i], 0);
    fprintf(stderr, "sampler vs reference: %ld draws equal, %ld of them not the plain argmax\n", draws, not_greedy);
    assert_true(draws > 5000);
    assert_true(not_greedy > draws / 4); /* the draws do reach past the first token */
    /* a scratch made for fewer tokens is refused, not overrun */
    bt_llsample_scratch *small = bt_llsample_scratch_new(100);
    assert_non_null(small);
    bt_llsample_params t1 = {.temperature = 1, .top_p = 1};
    assert_int_equal(bt_llsample(l, 101, &t1, NULL, 0, small), -1);
    bt_llsample_scratch_free(small);
    bt_llsample_scratch_free(s);
    free(ref_c);
    free(ref_counts);
    free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_split), cmocka_unit_test(test_utf8_invalid),
        cmocka_unit_test(test_stop),       cmocka_unit_test(test_migration_property),
        cmocka_unit_test(test_sampler),    cmocka_unit_test(test_sampler_adjust),
        cmocka_unit_test(test_sampler_equals_reference), cmocka_unit_test(test_stop_min_tokens),
        cmocka_unit_test(test_sampler_vllm), cmocka_unit_test(test_stop_kept),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
