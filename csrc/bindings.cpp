// pybind11 front of the tree walk: numpy buffers in (zero-copy when dtypes match), GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "walk.hpp"

namespace py = pybind11;
using namespace ibtpo;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
const T* checked(const Arr<T>& a, int64_t n, const char* name) {
  if (a.ndim() != 1) throw InvalidForest(std::string(name) + " must be 1-D");
  if (a.shape(0) != n) throw InvalidForest(std::string(name) + " has length " + std::to_string(a.shape(0)) + ", expected " + std::to_string(n));
  return a.data();
}

StepProb parse_step_prob(const std::string& s) {
  if (s == "geomean") return StepProb::Geomean;
  if (s == "product") return StepProb::Product;
  throw InvalidForest("step_prob must be 'geomean' or 'product', got '" + s + "'");
}

py::dict walk_py(Arr<int32_t> parent, Arr<int32_t> tree, Arr<double> logprob_sum, Arr<int64_t> num_tokens,
                 Arr<double> reward, int64_t num_trees, double beta, double lam, double eps, const std::string& step_prob) {
  if (parent.ndim() != 1) throw InvalidForest("parent must be 1-D");
  const int64_t n = parent.shape(0);
  ForestView f{n, num_trees, parent.data(), checked(tree, n, "tree"), checked(logprob_sum, n, "logprob_sum"),
               checked(num_tokens, n, "num_tokens"), checked(reward, n, "reward")};
  if (num_trees < 0) throw InvalidForest("num_trees must be >= 0");
  WalkParams prm{beta, lam, eps, parse_step_prob(step_prob)};

  py::array_t<int64_t> leaves(n);
  py::array_t<int32_t> num_children(n);
  py::array_t<double> correct(n), p(n), pi(n), ib(n), cov(n), agl(n), aib(n), adv(n), mean(num_trees), std_(num_trees);
  py::array_t<uint8_t> eff(num_trees);
  WalkOut o{leaves.mutable_data(), correct.mutable_data(), p.mutable_data(),   pi.mutable_data(),
            ib.mutable_data(),     cov.mutable_data(),     agl.mutable_data(), aib.mutable_data(),
            adv.mutable_data(),    num_children.mutable_data(), mean.mutable_data(), std_.mutable_data(),
            eff.mutable_data()};
  {
    py::gil_scoped_release release;
    walk(f, prm, o);
  }
  py::dict d;
  d["leaves"] = leaves;
  d["correct"] = correct;
  d["p"] = p;
  d["step_prob"] = pi;
  d["ib_score"] = ib;
  d["cov_eta"] = cov;
  d["adv_global"] = agl;
  d["adv_ib"] = aib;
  d["advantage"] = adv;
  d["num_children"] = num_children;
  d["tree_mean"] = mean;
  d["tree_std"] = std_;
  d["effective"] = eff.attr("astype")("bool");
  return d;
}

py::tuple leaf_paths_py(Arr<int32_t> parent) {
  if (parent.ndim() != 1) throw InvalidForest("parent must be 1-D");
  Paths paths;
  {
    py::gil_scoped_release release;
    paths = leaf_paths(parent.data(), parent.shape(0));
  }
  auto to_np = [](auto& v) { return py::array(v.size(), v.data()); };
  return py::make_tuple(to_np(paths.leaf_ids), to_np(paths.offsets), to_np(paths.nodes));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "IB-TPO tree walk: p, IB-Score, Cov(eta1, eta2), step-level advantages, leaf paths";
  py::register_exception<InvalidForest>(m, "InvalidForest", PyExc_ValueError);
  m.def("walk", &walk_py, py::arg("parent"), py::arg("tree"), py::arg("logprob_sum"), py::arg("num_tokens"),
        py::arg("reward"), py::arg("num_trees"), py::arg("beta") = 5.0, py::arg("lam") = 0.1, py::arg("eps") = 1e-6,
        py::arg("step_prob") = "geomean");
  m.def("leaf_paths", &leaf_paths_py, py::arg("parent"),
        "(leaf_ids, offsets, nodes): leaf k's root-to-leaf path is nodes[offsets[k]:offsets[k+1]]");
}
