#include "walk.hpp"

#include <cmath>
#include <limits>

namespace ibtpo {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

[[noreturn]] void fail(int64_t node, const std::string& what) {
  throw InvalidForest("node " + std::to_string(node) + ": " + what);
}

// Odds ratio r(v) = p(v) / p(u), 1 where p(u) = 0 (no information).
inline double odds_ratio(double p_child, double p_parent) {
  return p_parent > 0.0 ? p_child / p_parent : 1.0;
}

}  // namespace

void validate(const ForestView& f, int32_t* num_children) {
  const int64_t n = f.num_nodes;
  if (n > std::numeric_limits<int32_t>::max()) throw InvalidForest("too many nodes for int32 parents");
  for (int64_t i = 0; i < n; ++i) num_children[i] = 0;
  int64_t roots = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t u = f.parent[i];
    if (u == -1) {
      if (f.tree[i] != roots) fail(i, "root of tree " + std::to_string(f.tree[i]) + " but expected tree " + std::to_string(roots) + " (roots must number trees 0, 1, ... in order)");
      ++roots;
      continue;
    }
    if (u < -1 || u >= n) fail(i, "parent " + std::to_string(u) + " out of range");
    if (u >= i) fail(i, "parent " + std::to_string(u) + " does not precede it (forest must be topologically ordered)");
    if (f.tree[i] != f.tree[u]) fail(i, "tree id " + std::to_string(f.tree[i]) + " differs from its parent's " + std::to_string(f.tree[u]));
    if (f.num_tokens[i] <= 0) fail(i, "step has " + std::to_string(f.num_tokens[i]) + " tokens");
    if (!std::isfinite(f.logprob_sum[i])) fail(i, "logprob_sum is not finite");
    ++num_children[u];
  }
  if (roots != f.num_trees) throw InvalidForest("forest has " + std::to_string(roots) + " roots but num_trees is " + std::to_string(f.num_trees));
  for (int64_t i = 0; i < n; ++i) {
    const double r = f.reward[i];
    if (num_children[i] > 0) {
      if (!std::isnan(r)) fail(i, "reward set on a non-leaf");
    } else if (f.parent[i] == -1) {
      fail(i, "tree " + std::to_string(f.tree[i]) + " has no response");
    } else if (!std::isfinite(r)) {
      fail(i, std::isnan(r) ? "leaf has no reward (NaN)" : "leaf reward is infinite");
    }
  }
}

void validate(const ForestView& f) {
  std::vector<int32_t> num_children(static_cast<size_t>(f.num_nodes));
  validate(f, num_children.data());
}

// Four passes, each O(nodes): validate + child counts; leaves/correct (reverse: children come
// after parents); p, step probabilities, per-tree reward stats and each parent's sums over its
// children; then scores and advantages, once every parent's sums and every tree's std are final.
void walk(const ForestView& f, const WalkParams& prm, const WalkOut& o) {
  if (!(prm.beta > 0.0)) throw InvalidForest("beta must be > 0");
  validate(f, o.num_children);
  const int64_t n = f.num_nodes, t = f.num_trees;
  const auto N = static_cast<size_t>(n), T = static_cast<size_t>(t);
  const double shift = 1.0 + 1.0 / prm.beta;

  for (int64_t i = 0; i < n; ++i) {
    const bool leaf = o.num_children[i] == 0;
    o.leaves[i] = leaf ? 1 : 0;
    o.correct[i] = leaf ? f.reward[i] : 0.0;
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    const int32_t u = f.parent[i];
    if (u >= 0) {
      o.leaves[u] += o.leaves[i];
      o.correct[u] += o.correct[i];
    }
  }

  // s1, s2, s12: per parent, sums over its children of eta1, eta2 and eta1 * eta2.
  std::vector<double> s1(N, 0.0), s2(N, 0.0), s12(N, 0.0);
  std::vector<double> sq(T, 0.0), lo(T, kNaN), hi(T, kNaN);
  for (int64_t i = 0; i < n; ++i) {
    o.p[i] = o.correct[i] / static_cast<double>(o.leaves[i]);
    const int32_t u = f.parent[i], k = f.tree[i];
    if (u < 0) {
      o.tree_mean[k] = o.p[i];  // the root precedes its tree's nodes
      o.step_prob[i] = kNaN;
      continue;
    }
    const double lp = prm.step_prob == StepProb::Geomean ? f.logprob_sum[i] / static_cast<double>(f.num_tokens[i]) : f.logprob_sum[i];
    const double eta1 = odds_ratio(o.p[i], o.p[u]) - shift, eta2 = std::exp(lp);
    o.step_prob[i] = eta2;
    o.adv_ib[i] = eta1 * eta2;
    s1[u] += eta1;
    s2[u] += eta2;
    s12[u] += eta1 * eta2;
    if (o.num_children[i] == 0) {
      const double r = f.reward[i], d = r - o.tree_mean[k];
      sq[k] += d * d;
      if (!(r >= lo[k])) lo[k] = r;  // also replaces the initial NaN
      if (!(r <= hi[k])) hi[k] = r;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (f.parent[i] >= 0) continue;
    const int32_t k = f.tree[i];
    const int64_t m = o.leaves[i];
    o.tree_std[k] = m > 1 ? std::sqrt(sq[k] / static_cast<double>(m - 1)) : 0.0;
    o.effective[k] = lo[k] != hi[k] ? 1 : 0;
  }

  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = o.num_children[i];
    o.ib_score[i] = b > 0 ? (1.0 + prm.beta) / b * s12[i] : kNaN;
    // Cov(eta1, eta2) with n - 1; the terms are O(1), so the one-pass form loses nothing here.
    o.cov_eta[i] = b >= 2 ? (s12[i] - s1[i] * s2[i] / b) / (b - 1) : kNaN;
    if (f.parent[i] < 0) {
      o.adv_global[i] = o.adv_ib[i] = o.advantage[i] = kNaN;
      continue;
    }
    const int32_t k = f.tree[i];
    o.adv_global[i] = (o.p[i] - o.tree_mean[k]) / (o.tree_std[k] + prm.eps);
    o.advantage[i] = o.adv_global[i] + prm.lam * o.adv_ib[i];
  }
}

}  // namespace ibtpo
