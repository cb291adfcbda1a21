// train_digits — a 64-32-10 tanh MLP on the 8×8 digits (data/digits.bin) trained with K-FAC
// through the C++ wrapper kfac.hpp: forward and backward passes here, per-example output
// gradients and layer inputs recorded with the library, the mean-loss gradients turned into
// directions by kfac::optimizer::step, then plain SGD on the directions.
//
//   train_digits [data/digits.bin] [epochs]
//
// The data format (DIGITS01 / DIGITS02, data/README.md): an 8-byte magic, n and d as
// little-endian uint32 (DIGITS02: then the largest pixel value), n·d pixel bytes, n label bytes.
// The first n − 297 images train, the last 297 test, as in the C examples.
#include <kfac.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Dataset {
    int n = 0, d = 0;
    std::vector<float> x;    // [n][d], scaled to [0, 1]
    std::vector<uint8_t> y;  // [n]
};

uint32_t le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | uint32_t(p[3]) << 24; }

Dataset load(const std::string &path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw std::runtime_error("cannot open " + path);
    std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const bool v1 = bytes.size() >= 16 && std::memcmp(bytes.data(), "DIGITS01", 8) == 0;
    const bool v2 = bytes.size() >= 20 && std::memcmp(bytes.data(), "DIGITS02", 8) == 0;
    if (!v1 && !v2) throw std::runtime_error(path + ": not a DIGITS01 or DIGITS02 file");
    const size_t header = v1 ? 16 : 20;
    Dataset ds;
    ds.n = int(le32(&bytes[8]));
    ds.d = int(le32(&bytes[12]));
    const float max_value = v1 ? 16.0f : float(le32(&bytes[16]));
    if (ds.n < 400 || ds.d != 64 || bytes.size() != header + size_t(ds.n) * (ds.d + 1))
        throw std::runtime_error(path + ": not the 8x8 digits (sizes do not match)");
    ds.x.resize(size_t(ds.n) * ds.d);
    for (size_t i = 0; i < ds.x.size(); ++i) ds.x[i] = bytes[header + i] / max_value;
    ds.y.assign(bytes.begin() + header + ds.x.size(), bytes.end());
    return ds;
}

// A dense layer s = W a + b, W [out][in] row-major, with its gradient buffers.
struct Dense {
    int in, out;
    std::vector<float> w, b, dw, db;
    Dense(int in_, int out_, std::mt19937 &rng) : in(in_), out(out_), w(size_t(in_) * out_), b(out_), dw(w.size()), db(out_) {
        std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(float(in)));
        for (float &v : w) v = normal(rng);
    }
    void forward(const float *a, int rows, float *s) const {
        for (int r = 0; r < rows; ++r)
            for (int o = 0; o < out; ++o) {
                float sum = b[o];
                for (int i = 0; i < in; ++i) sum += w[size_t(o) * in + i] * a[size_t(r) * in + i];
                s[size_t(r) * out + o] = sum;
            }
    }
    // Gradients of the mean loss from the per-example output gradients g; da (may be null) ← gᵀW.
    void backward(const float *a, const float *g, int rows, float *da) {
        std::fill(dw.begin(), dw.end(), 0.0f);
        std::fill(db.begin(), db.end(), 0.0f);
        for (int r = 0; r < rows; ++r)
            for (int o = 0; o < out; ++o) {
                const float go = g[size_t(r) * out + o] / rows;
                db[o] += go;
                for (int i = 0; i < in; ++i) dw[size_t(o) * in + i] += go * a[size_t(r) * in + i];
            }
        if (da)
            for (int r = 0; r < rows; ++r)
                for (int i = 0; i < in; ++i) {
                    float sum = 0;
                    for (int o = 0; o < out; ++o) sum += g[size_t(r) * out + o] * w[size_t(o) * in + i];
                    da[size_t(r) * in + i] = sum;
                }
    }
    void apply(float lr) {
        for (size_t i = 0; i < w.size(); ++i) w[i] -= lr * dw[i];
        for (int o = 0; o < out; ++o) b[o] -= lr * db[o];
    }
};

kfac_dense_desc describe(const Dense &layer) {
    kfac_dense_desc desc = kfac::dense_desc();
    desc.in_features = layer.in;
    desc.out_features = layer.out;
    desc.has_bias = 1;
    return desc;
}

// Softmax cross-entropy: per-example gradients p − onehot into g; returns (summed loss, correct).
std::pair<double, int> softmax_xent(const float *logits, const uint8_t *labels, int rows, float *g) {
    double loss = 0;
    int correct = 0;
    for (int r = 0; r < rows; ++r) {
        const float *z = logits + size_t(r) * 10;
        const float top = *std::max_element(z, z + 10);
        double total = 0;
        for (int k = 0; k < 10; ++k) total += std::exp(double(z[k] - top));
        for (int k = 0; k < 10; ++k) g[size_t(r) * 10 + k] = float(std::exp(double(z[k] - top)) / total) - (k == labels[r]);
        loss += std::log(total) + top - z[labels[r]];
        correct += int(std::max_element(z, z + 10) - z) == labels[r];
    }
    return {loss, correct};
}

}  // namespace

int main(int argc, char **argv) try {
    const std::string path = argc > 1 ? argv[1] : "data/digits.bin";
    const int epochs = argc > 2 ? std::atoi(argv[2]) : 10;
    const Dataset ds = load(path);
    const int n_test = 297, n_train = ds.n - n_test, batch = 128;
    std::printf("libkfac %s (kfac.hpp for %s); %d training and %d test images, batch %d\n", kfac::version_string(),
                KFAC_VERSION_STRING, n_train, n_test, batch);

    std::mt19937 rng(20240601);
    Dense l0(64, 32, rng), l1(32, 10, rng);
    kfac::optimizer opt(KFAC_FLOAT32);
    opt.param_set_double(KFAC_PARAM_DAMPING, 1e-3);
    opt.param_set_double(KFAC_PARAM_LEARNING_RATE, 0.1);
    const int32_t id0 = opt.layer_add_dense(describe(l0)), id1 = opt.layer_add_dense(describe(l1));
    for (int32_t id : kfac::param_list()) {
        const kfac_param_info info = kfac::param_get_info(id);
        if (info.family == KFAC_FAMILY_CORE && info.type == KFAC_PARAM_TYPE_DOUBLE)
            std::printf("  %-20s %g\n", info.name, opt.param_get_double(id));
    }

    std::vector<float> xb(size_t(batch) * 64), s0(size_t(batch) * 32), h(s0.size()), logits(size_t(batch) * 10),
        g1(logits.size()), dh(h.size());
    std::vector<uint8_t> yb(batch);
    std::vector<int> order(n_train);
    std::iota(order.begin(), order.end(), 0);
    auto evaluate = [&](int first, int count) {
        double loss = 0;
        int correct = 0;
        for (int start = first; start < first + count; start += batch) {
            const int rows = std::min(batch, first + count - start);
            l0.forward(&ds.x[size_t(start) * 64], rows, s0.data());
            for (size_t i = 0; i < size_t(rows) * 32; ++i) h[i] = std::tanh(s0[i]);
            l1.forward(h.data(), rows, logits.data());
            auto [l, c] = softmax_xent(logits.data(), &ds.y[start], rows, g1.data());
            loss += l;
            correct += c;
        }
        return std::make_pair(loss / count, 100.0 * correct / count);
    };
    const double initial_loss = evaluate(0, n_train).first;
    for (int epoch = 1; epoch <= epochs; ++epoch) {
        std::shuffle(order.begin(), order.end(), rng);
        for (int start = 0; start + batch <= n_train; start += batch) {
            for (int r = 0; r < batch; ++r) {
                std::copy_n(&ds.x[size_t(order[start + r]) * 64], 64, &xb[size_t(r) * 64]);
                yb[r] = ds.y[order[start + r]];
            }
            l0.forward(xb.data(), batch, s0.data());
            for (size_t i = 0; i < h.size(); ++i) h[i] = std::tanh(s0[i]);
            l1.forward(h.data(), batch, logits.data());
            softmax_xent(logits.data(), yb.data(), batch, g1.data());
            l1.backward(h.data(), g1.data(), batch, dh.data());
            for (size_t i = 0; i < dh.size(); ++i) dh[i] *= 1.0f - h[i] * h[i];  // now ∂ℓ/∂s0
            l0.backward(xb.data(), dh.data(), batch, nullptr);
            if (opt.wants_statistics()) {  // per-example gradients of the summed loss (KFAC_REDUCTION_SUM)
                opt.layer_record_inputs(id0, xb.data(), batch);
                opt.layer_record_inputs(id1, h.data(), batch);
                opt.layer_record_output_grads(id0, dh.data(), batch);
                opt.layer_record_output_grads(id1, g1.data(), batch);
            }
            opt.step({l0.dw.data(), l1.dw.data()}, {l0.db.data(), l1.db.data()});
            l0.apply(0.1f);
            l1.apply(0.1f);
        }
        const auto [train_loss, train_acc] = evaluate(0, n_train);
        const auto [test_loss, test_acc] = evaluate(n_train, n_test);
        std::printf("epoch %2d  train loss %.4f (%.1f%%)  test loss %.4f  test accuracy %.1f%%  kl scale %.3f\n", epoch,
                    train_loss, train_acc, test_loss, test_acc, opt.get_kl_scale());
        if (epoch == epochs && !(train_loss < 0.5 * initial_loss)) {
            std::fprintf(stderr, "train_digits: the loss did not fall (%.4f -> %.4f)\n", initial_loss, train_loss);
            return 1;
        }
    }
    std::printf("%lld K-FAC steps\n", static_cast<long long>(opt.get_step_count()));
    return 0;
} catch (const kfac::error &e) {
    std::fprintf(stderr, "train_digits: %s\n", e.what());
    return 1;
} catch (const std::exception &e) {
    std::fprintf(stderr, "train_digits: %s\n", e.what());
    return 1;
}
