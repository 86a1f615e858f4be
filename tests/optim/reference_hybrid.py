r"""Slow reference HybridOptimizer, written line by line from the math in `hybridopt.optim.hybrid`'s docstring.

Plain Python loops over tensors, no foreach, none of the optimizer module's helpers; only the controller
network itself (`AuxiliaryNN`: its running feature norm, MLP, clamp and bound penalty) and `TrainingState`
(the feature vector) come from the package. `tests/optim/test_hybrid_reference.py` feeds it and the fast optimizer
identical gradients and compares the parameters.
"""

from __future__ import annotations

import math

import torch

from hybridopt.optim.controller import AuxiliaryNN, TrainingState


def _newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton-Schulz iterations X <- aX + b(XX^T)X + c(XX^T)(XX^T)X from X = x / |x|_F, on the wide
    orientation (torch.optim.Muon's coefficients), in float32 at least."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = x.double() if x.dtype == torch.float64 else x.float()
    if x.shape[0] > x.shape[1]:
        X = X.T
    X = X / max(float(X.norm()), 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    if x.shape[0] > x.shape[1]:
        X = X.T
    return X.to(x.dtype)


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


class ReferenceHybrid:
    """Same constructor arguments as `HybridOptimizer`; `param_groups` may be edited (lr, trust_radius)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, base="muon",
                 use_controller=None, use_trust_region=True, trust_radius=0.1, adapt_radius=False,
                 controller_lr=1e-3, controller_hidden=16, num_clusters=0, learn_scale=True, scale_lr=0.1,
                 scale_betas=(0.9, 0.99), scale_threshold=0.5, min_scale=None, radius_start=None, muon_momentum=0.95):
        if use_controller is None:  # no controller over Schedule-Free unless asked for
            use_controller = base != "schedulefree"
        params = list(params)
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_radius=trust_radius,
                        orthogonalize=True)
        self.defaults = defaults
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in params]
        self.base, self.num_clusters = base, num_clusters
        self.nu = muon_momentum
        self.use_controller = use_controller
        self.use_trust_region, self.adapt_radius = use_trust_region, adapt_radius
        self.learn_scale, self.kappa, self.scale_betas = learn_scale, scale_lr, scale_betas
        self.tau = scale_threshold
        if min_scale is None:  # the scale may only raise Schedule-Free's rate
            min_scale = 1.0 if base == "schedulefree" else 1e-4
        self.ell_min = math.log(min_scale)
        if radius_start is None:  # over Schedule-Free the first step after the warmup starts at a quarter of the radius
            radius_start = 0.25 if base in ("schedulefree", "muon") else 0.0
        self.radius_start = radius_start
        self.ratio = None  # global trust region: the last step's radius over the length of its update
        self.started = False
        self.controller = AuxiliaryNN(controller_hidden)
        self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=controller_lr)
        self.state = {}  # id(p) -> {"n", "m", "v" or "b", "s"}
        self.t = 0  # applied updates
        self.skipped = 0
        self.m_lr, self.m_r = 1.0, 1.0  # e^{\ell + c_t}, e^{a_{t,2}}
        self.c = 0.0  # c_t = a_{t,1}
        self.ell = 0.0  # the learned log scale
        self.hm, self.hv, self.hn = 0.0, 0.0, 0  # EMAs of h and h^2, and their count
        self.prev_lr = math.inf  # the first group's lr at the last step
        self.x_prev = None  # normalised features at the last update
        self.clipped = False
        self.clipped_count = 0
        self.m_lr_sum = 0.0
        self.cluster_id = None
        self.loss_ema, self.trend, self.gmean, self.gvar = None, 0.0, None, 0.0
        self.prev_loss, self.prev_pred, self.rbar = None, None, None

    def add_param_group(self, group):
        """A new group takes the defaults, and the first group's current radius; its state starts at its first step."""
        self.param_groups.append({**self.defaults, "trust_radius": self.param_groups[0]["trust_radius"], **group,
                                  "params": list(group["params"])})

    def set_cluster(self, cluster_id):
        self.cluster_id = cluster_id

    @torch.no_grad()
    def step(self, loss=None):
        L = math.nan if loss is None else float(loss)
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    items.append((p, group))

        # \|g_t\|, squared in float32 at least
        gnorm_sq = 0.0
        for p, _ in items:
            g32 = p.grad if p.grad.dtype == torch.float64 else p.grad.float()
            gnorm_sq += float((g32 * g32).sum())
        gnorm = math.sqrt(gnorm_sq)

        # A non-finite loss or gradient skips the step (and with adapt_radius, once an update has been applied,
        # halves rho).
        if not _finite(gnorm) or (loss is not None and not _finite(L)):
            self.skipped += 1
            if self.adapt_radius and self.use_trust_region and self.t > 0:
                for group in self.param_groups:
                    group["trust_radius"] = max(1e-4, group["trust_radius"] / 2)
            return

        # Radius adaptation: r_t = (L_{t-1} - L_t) / (-g_{t-1} . Delta theta_{t-1}), after a clipped step.
        if self.adapt_radius and self.use_trust_region and _finite(L) and self.prev_loss is not None \
                and self.prev_pred is not None and self.prev_pred != 0:
            r = (self.prev_loss - L) / self.prev_pred
            self.rbar = r if self.rbar is None else 0.9 * self.rbar + 0.1 * r
            for group in self.param_groups:
                if self.clipped and self.rbar > 0.75:
                    group["trust_radius"] = min(1.0, 1.5 * group["trust_radius"])
                elif self.clipped and self.rbar < 0.25:
                    group["trust_radius"] = max(1e-4, 0.7 * group["trust_radius"])

        # h_t = g_t . s_{t-1}, normalised as Adam normalises a gradient; the scale and the controller learn from it.
        rising = self.param_groups[0]["lr"] > self.prev_lr  # a warmup is raising the rate
        self.prev_lr = self.param_groups[0]["lr"]
        learns = self.learn_scale or self.use_controller
        if learns and self.t > 0:
            h = 0.0
            for p, _ in items:
                if id(p) in self.state and "s" in self.state[id(p)]:
                    h += float((p.grad.double() * self.state[id(p)]["s"].double()).sum())
            b1, b2 = self.scale_betas
            self.hn += 1
            self.hm = b1 * self.hm + (1 - b1) * h
            self.hv = b2 * self.hv + (1 - b2) * h * h
            sigma = (self.hm / (1 - b1 ** self.hn)) / (math.sqrt(self.hv / (1 - b2 ** self.hn)) + 1e-30)
            if self.learn_scale and rising:  # a warmup holds the scale, and its evidence is dropped
                self.hm, self.hv, self.hn = 0.0, 0.0, 0
            elif self.learn_scale:  # after a clipped step the scale may only shrink
                step_signal = max(sigma, 0.0) if self.clipped else sigma
                # the threshold is tau for the settled moments and grows with the spread that zero-mean noise
                # gives the bias-corrected mean of only hn hypergradients (about 1 for one, so no step)
                spread_n = (1 - b1) * (1 + b1 ** self.hn) / ((1 + b1) * (1 - b1 ** self.hn))
                spread = (1 - b1) / (1 + b1)
                if abs(step_signal) > self.tau * math.sqrt(spread_n / spread):  # weaker evidence leaves the scale
                    # lowering after a clipped step starts from the rate whose step the radius allowed
                    drop = math.log(self.ratio) if self.clipped and step_signal > 0 and self.ratio is not None else 0.0
                    self.ell = min(math.log(1e4), max(self.ell_min, self.ell + drop - self.kappa * step_signal))
                if not self.started:  # the first step after the warmup: raised to radius_start x the radius's rate
                    self.started = True
                    if self.radius_start > 0 and self.ratio is not None and self.radius_start * self.ratio > 1:
                        self.ell = min(math.log(1e4), self.ell + math.log(self.radius_start * self.ratio))
            if self.use_controller:
                heads = [0, 1] if self.clipped else [0]  # the radius learns on clipped steps
                with torch.enable_grad():
                    z = self.controller.raw(self.x_prev)
                    surrogate = sigma * sum(AuxiliaryNN.clamp(z)[k] for k in heads) + AuxiliaryNN.bound_penalty(z)
                    self.controller_opt.zero_grad()
                    surrogate.backward()
                self.controller_opt.step()

        # Features (smoothed loss and gradient norm) -> a_t = (c_t, log r_t); m_t = e^{ell + c_t}.
        if self.use_controller:
            if self.gmean is None:
                self.gmean = gnorm
            dev = gnorm - self.gmean
            self.gmean = self.gmean + 0.1 * dev
            self.gvar = 0.9 * self.gvar + 0.1 * dev * dev
            if _finite(L):
                if self.loss_ema is not None and L > 0 and self.loss_ema > 0:
                    self.trend = 0.9 * self.trend + 0.1 * (math.log(L) - math.log(self.loss_ema))
                self.loss_ema = L if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * L
            state = TrainingState(loss=self.loss_ema if self.loss_ema is not None else 1.0,
                                  gradient_magnitude=self.gmean, loss_trend=self.trend,
                                  gradient_variance=self.gvar / max(self.gmean ** 2, 1e-12), step=self.t,
                                  cluster_id=self.cluster_id, num_clusters=self.num_clusters)
            raw = state.features()
            self.controller.norm.update(raw)
            x = self.controller.norm(raw)
            a = AuxiliaryNN.clamp(self.controller.raw(x))
            self.c = float(a[0])
            self.m_lr, self.m_r = math.exp(self.ell + self.c), math.exp(float(a[1]))
            self.x_prev = x.clone()
        elif self.learn_scale:
            self.m_lr = math.exp(self.ell)
        self.t += 1

        # u_t = -eta m_t (d_t + lambda theta_t)
        updates = []
        for p, group in items:
            beta1, beta2 = group["betas"]
            st = self.state.setdefault(id(p), {"n": 0})
            st["n"] += 1
            g = p.grad
            decay = group["weight_decay"] * p  # decoupled: added to the step (SGD: to the gradient)
            if self.base == "muon" and p.dim() == 2 and group["orthogonalize"]:
                # Nesterov momentum, orthogonalised, at Adam's RMS: 0.2 sqrt(max(A, B)) O(g + nu (b - g))
                st["b"] = st.get("b", torch.zeros_like(p)) + (1 - self.nu) * (g - st.get("b", torch.zeros_like(p)))
                d = 0.2 * math.sqrt(max(p.shape)) * _newton_schulz(g + self.nu * (st["b"] - g))
            elif self.base in ("adam", "muon"):
                st["m"] = beta1 * st.get("m", torch.zeros_like(p)) + (1 - beta1) * g
                st["v"] = beta2 * st.get("v", torch.zeros_like(p)) + (1 - beta2) * g * g
                m_hat = st["m"] / (1 - beta1 ** st["n"])
                v_hat = st["v"] / (1 - beta2 ** st["n"])
                d = m_hat / (torch.sqrt(v_hat) + group["eps"])
            elif self.base == "schedulefree":  # d = g / (sqrt(v_hat) + eps); z starts at the parameters
                st.setdefault("z", p.detach().clone())
                st["v"] = beta2 * st.get("v", torch.zeros_like(p)) + (1 - beta2) * g * g
                # bias-corrected by the group's step count (schedulefree's, which counts every step of the optimizer)
                d = g / (torch.sqrt(st["v"] / (1 - beta2 ** (group.get("sf_k", 0) + 1))) + group["eps"])
            else:
                st["b"] = beta1 * st.get("b", torch.zeros_like(p)) + g + decay
                d, decay = st["b"], 0.0
            updates.append(-group["lr"] * self.m_lr * (d + decay))

        # Trust region.
        clipped = False
        if self.use_trust_region:
            mu = self.param_groups[0]["trust_radius"] * self.m_r
            theta_sq, u_sq = 0.0, 0.0
            for (p, _), u in zip(items, updates):
                theta_sq += float((p * p).sum())
                u_sq += float((u * u).sum())
            bound = mu * max(math.sqrt(theta_sq), 1e-3)
            self.ratio = bound / math.sqrt(u_sq) if u_sq > 0 else 1.0
            if math.sqrt(u_sq) > bound:
                updates = [u * (bound / math.sqrt(u_sq)) for u in updates]
                clipped = True
        self.clipped = clipped
        self.clipped_count += int(clipped)
        self.m_lr_sum += self.m_lr

        if self.adapt_radius and self.use_trust_region:
            self.prev_pred = -sum(float((p.grad.float() * u.float()).sum()) for (p, _), u in zip(items, updates))
            self.prev_loss = L if _finite(L) else None

        # Delta theta_t applied; s_t = Delta theta_t (kept while something learns), where a tensor this step did
        # not move has Delta theta_t = 0.
        moved = {id(p) for p, _ in items}
        for key, st in self.state.items():
            if key not in moved and "s" in st:
                st["s"] = 0 * st["s"]
        # Schedule-Free: c = w / sum w with w = (max rate so far)^2, per group (every group at every step, as
        # schedulefree counts); y <- y + c (z - y) + (1 - beta1 (1 - c)) Delta, z <- z + Delta.
        weights = {}
        if self.base == "schedulefree":
            for group in self.param_groups:
                group["sf_k"] = group.get("sf_k", 0) + 1
                rate = group["lr"] * self.m_lr
                group["sf_lr_max"] = max(group.get("sf_lr_max", 0.0), rate)
                group["sf_weight_sum"] = group.get("sf_weight_sum", 0.0) + group["sf_lr_max"] ** 2
                weights[id(group)] = group["sf_lr_max"] ** 2 / group["sf_weight_sum"]
        for (p, group), u in zip(items, updates):
            st = self.state[id(p)]
            if self.base == "schedulefree":
                c, beta1 = weights[id(group)], group["betas"][0]
                p.copy_(p + c * (st["z"] - p) + (1 - beta1 * (1 - c)) * u)
                st["z"] = st["z"] + u
            else:
                p.add_(u)
            if learns:
                st["s"] = u

    @torch.no_grad()
    def eval(self):
        """Schedule-Free: the parameters become x = (y - (1 - beta1) z) / beta1."""
        for group in self.param_groups:
            for p in group["params"]:
                if "z" in self.state.get(id(p), {}):
                    beta1 = group["betas"][0]
                    p.copy_((p - (1 - beta1) * self.state[id(p)]["z"]) / beta1)

    def summary(self) -> dict:
        steps = max(1, self.t)
        return {"total_steps": self.t, "avg_lr_multiplier": self.m_lr_sum / steps,
                "constraint_activation_rate": self.clipped_count / steps,
                "learned_scale": math.exp(self.ell),
                "trust_radius": self.param_groups[0]["trust_radius"] * self.m_r if self.use_trust_region else None,
                "lr_multiplier": self.m_lr,
                "skipped_steps": self.skipped, "clipped": self.clipped}
