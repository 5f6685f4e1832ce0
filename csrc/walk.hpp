// IB-TPO tree walk over a Forest (docs/algorithm.md sections 1, 2, 4): plain C++ over raw buffers,
// no Python types, so the bindings can release the GIL around it.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ibtpo {

// Thrown for malformed input; the bindings turn it into a Python ValueError.
struct InvalidForest : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

enum class StepProb { Geomean, Product };

struct ForestView {
  int64_t num_nodes = 0;
  int64_t num_trees = 0;
  const int32_t* parent = nullptr;
  const int32_t* tree = nullptr;
  const double* logprob_sum = nullptr;
  const int64_t* num_tokens = nullptr;
  const double* reward = nullptr;  // NaN on non-leaves
};

struct WalkParams {
  double beta = 5.0;
  double lam = 0.1;
  double eps = 1e-6;
  StepProb step_prob = StepProb::Product;
};

// Caller-owned outputs: per node (num_nodes) and per tree (num_trees).
struct WalkOut {
  int64_t* leaves;
  double* correct;
  double* p;
  double* step_prob;
  double* ib_score;
  double* cov_eta;
  double* adv_global;
  double* adv_ib;
  double* advantage;
  int32_t* num_children;
  double* tree_mean;
  double* tree_std;
  uint8_t* effective;
};

// Checks the structure; throws InvalidForest naming the first bad node.
void validate(const ForestView& f);
// Same, also filling num_children (num_nodes entries).
void validate(const ForestView& f, int32_t* num_children);
// Fills every output. Calls validate first.
void walk(const ForestView& f, const WalkParams& params, const WalkOut& out);

// Root-to-leaf node paths in CSR form: leaf_ids[k]'s path is nodes[offsets[k]:offsets[k+1]].
struct Paths {
  std::vector<int32_t> leaf_ids;
  std::vector<int64_t> offsets;
  std::vector<int32_t> nodes;
};
Paths leaf_paths(const int32_t* parent, int64_t num_nodes);

}  // namespace ibtpo
