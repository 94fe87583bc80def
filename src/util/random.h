#pragma once
// Deterministic, platform-independent random numbers (std distributions differ between
// standard libraries, and generated models/tests must be identical everywhere).
#include <cmath>
#include <cstdint>

namespace dsv4 {

class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull) {}
  uint64_t next_u64() {  // splitmix64
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }  // [0, 1)
  // [0, 1) on a 2^-24 grid, exact as a float: what the sampler hands to Backend::sample.
  float uniform_f32() { return float(next_u64() >> 40) * 0x1.0p-24f; }
  float uniform(float lo, float hi) { return lo + float(uniform()) * (hi - lo); }
  uint64_t below(uint64_t n) { return next_u64() % n; }
  float normal() {  // Box-Muller
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  uint64_t s_;
};

}  // namespace dsv4
