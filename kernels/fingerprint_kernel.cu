// Randomized fingerprint detection in one launch (Fisher, Shahar & Resheff, 2024, Sec. 3.3).
// Two kernels: `fingerprint_scores` (values and all three scores, for evaluation) and
// `fingerprint_lrt` (the likelihood-ratio score alone, what a server flags on).
//
// One block per image; its threads stride over the image's m drawn fingerprints. Each thread
// gathers the fingerprint's neurons from the image's activation row, averages them (the
// fingerprint value), and scores the value against the fingerprint's clean and attacked
// Gaussians. A shared-memory tree reduction turns the per-draw terms into the image's three
// scores, each a mean over the m draws:
//   scores[b, 0]  lrt      mean of log N(v; clean) - log N(v; attacked)
//   scores[b, 1]  vote     fraction of draws closer (in z-units) to clean than to attacked
//   scores[b, 2]  anomaly  mean of log N(v; clean)
// Same definitions as kernels/scoring.py, the NumPy reference. blockDim.x must be a power of two;
// dynamic shared memory holds 3 * blockDim.x floats.

#define HALF_LOG_2PI 0.91893853320467274178f

// The value of fingerprint f on one image: the mean of the image's activations over its neurons.
__device__ __forceinline__ float fingerprint_value(const float* __restrict__ row, const int* __restrict__ indices,
                                                   const int* __restrict__ lengths, const long long f,
                                                   const int kmax)
{
    const int* neurons = indices + (size_t)f * kmax;
    const int len = lengths[f];
    float sum = 0.0f;
    for (int t = 0; t < len; ++t) {
        sum += __ldg(row + neurons[t]);
    }
    return sum / (float)len;
}

extern "C" __global__ void fingerprint_scores(
    const float* __restrict__ acts,           // (B, D) activations
    const long long* __restrict__ ids,        // (B, m) drawn fingerprint rows
    const int* __restrict__ indices,          // (F, kmax) neuron ids, padded past lengths[f]
    const int* __restrict__ lengths,          // (F,)
    const float* __restrict__ clean_mean,     // (F,)
    const float* __restrict__ clean_std,      // (F,)
    const float* __restrict__ attacked_mean,  // (F,)
    const float* __restrict__ attacked_std,   // (F,)
    const int num_neurons,
    const int m,
    const int kmax,
    float* __restrict__ values,               // (B, m) out: fingerprint values
    float* __restrict__ scores)               // (B, 3) out: lrt, vote, anomaly
{
    extern __shared__ float partial[];
    const int b = blockIdx.x;
    const float* row = acts + (size_t)b * num_neurons;
    float lrt = 0.0f, vote = 0.0f, clean_ll = 0.0f;

    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const long long f = ids[(size_t)b * m + j];
        const float v = fingerprint_value(row, indices, lengths, f, kmax);
        values[(size_t)b * m + j] = v;
        const float zc = (v - clean_mean[f]) / clean_std[f];
        const float za = (v - attacked_mean[f]) / attacked_std[f];
        const float ll = -0.5f * zc * zc - logf(clean_std[f]);
        lrt += ll + 0.5f * za * za + logf(attacked_std[f]);
        vote += fabsf(zc) < fabsf(za) ? 1.0f : 0.0f;
        clean_ll += ll;
    }

    const int n = blockDim.x;
    partial[threadIdx.x] = lrt;
    partial[n + threadIdx.x] = vote;
    partial[2 * n + threadIdx.x] = clean_ll;
    __syncthreads();
    for (int stride = n / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) {
            partial[threadIdx.x] += partial[threadIdx.x + stride];
            partial[n + threadIdx.x] += partial[n + threadIdx.x + stride];
            partial[2 * n + threadIdx.x] += partial[2 * n + threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        scores[(size_t)b * 3 + 0] = partial[0] / (float)m;
        scores[(size_t)b * 3 + 1] = partial[n] / (float)m;
        scores[(size_t)b * 3 + 2] = partial[2 * n] / (float)m - HALF_LOG_2PI;
    }
}

// The serving launch: the LRT score alone, each drawn fingerprint's Gaussians read from the packed
// (5, F) table of kernels/bank.py (Bank.lrt_params: clean mean, 1 / clean std, attacked mean,
// 1 / attacked std, log(attacked std / clean std)), so a draw costs five loads and no logf. One block
// per image; the launcher sizes blockDim.x to m (a power of two, 32 to 128 threads), so small draws
// do not leave most threads idle. Dynamic shared memory holds blockDim.x floats.
extern "C" __global__ void fingerprint_lrt(
    const float* __restrict__ acts,           // (B, D) activations
    const long long* __restrict__ ids,        // (B, m) drawn fingerprint rows
    const int* __restrict__ indices,          // (F, kmax) neuron ids, padded past lengths[f]
    const int* __restrict__ lengths,          // (F,)
    const float* __restrict__ params,         // (5, F) packed Gaussians
    const int num_fingerprints,
    const int num_neurons,
    const int m,
    const int kmax,
    float* __restrict__ lrt_out)              // (B,) out: mean log-likelihood ratio
{
    extern __shared__ float partial[];
    const int b = blockIdx.x;
    const float* row = acts + (size_t)b * num_neurons;
    const size_t nf = (size_t)num_fingerprints;
    float lrt = 0.0f;

    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const long long f = ids[(size_t)b * m + j];
        const float v = fingerprint_value(row, indices, lengths, f, kmax);
        const float zc = (v - params[f]) * params[nf + f];
        const float za = (v - params[2 * nf + f]) * params[3 * nf + f];
        lrt += 0.5f * (za * za - zc * zc) + params[4 * nf + f];
    }

    partial[threadIdx.x] = lrt;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) {
            partial[threadIdx.x] += partial[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        lrt_out[b] = partial[0] / (float)m;
    }
}
