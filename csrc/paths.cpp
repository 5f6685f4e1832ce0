#include "walk.hpp"

namespace ibtpo {

Paths leaf_paths(const int32_t* parent, int64_t n) {
  std::vector<int32_t> depth(static_cast<size_t>(n), 0);
  std::vector<uint8_t> has_child(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t u = parent[i];
    if (u < -1 || u >= i) throw InvalidForest("node " + std::to_string(i) + ": parent " + std::to_string(u) + " out of range or not before it");
    if (u >= 0) {
      depth[i] = depth[u] + 1;
      has_child[u] = 1;
    }
  }
  Paths out;
  out.offsets.push_back(0);
  for (int64_t i = 0; i < n; ++i) {
    if (has_child[i] || parent[i] < 0) continue;
    out.leaf_ids.push_back(static_cast<int32_t>(i));
    const size_t start = out.nodes.size();
    out.nodes.resize(start + depth[i] + 1);
    for (int64_t v = i, j = depth[i]; v >= 0; v = parent[v], --j) out.nodes[start + j] = static_cast<int32_t>(v);
    out.offsets.push_back(static_cast<int64_t>(out.nodes.size()));
  }
  return out;
}

}  // namespace ibtpo
