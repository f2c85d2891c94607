//! Small convolutional networks on images (the MNIST ConvNet optimizee).

use metac_graphs::{ConvParams, DType, Graph, NodeId};

/// One convolution layer: square kernel, same stride and padding on both
/// axes, followed by a bias and a ReLU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvLayer {
    pub fn params(&self) -> ConvParams {
        ConvParams {
            stride: [self.stride; 2],
            pads: [self.pad; 4],
            dilation: [1, 1],
            group: 1,
        }
    }

    /// Output size of one spatial axis of length `n`.
    pub fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.pad - self.kernel) / self.stride + 1
    }
}

/// `conv -> bias -> relu` layers, then flatten and one linear layer to the
/// class logits. Parameters are graph inputs named `conv{i}_w` (OIHW),
/// `conv{i}_b`, `fc_w` (`[features, classes]`) and `fc_b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvNet {
    /// Channels, height and width of one input image.
    pub input: [usize; 3],
    pub convs: Vec<ConvLayer>,
    pub classes: usize,
}

impl ConvNet {
    /// The MNIST meta-test ConvNet: 3x3 conv, 8 channels, stride 2, pad 1
    /// (28 -> 14) -> ReLU -> 3x3 conv, 16 channels, stride 2, pad 1 (14 -> 7)
    /// -> ReLU -> flatten (784) -> linear 10. 9,098 parameters.
    pub fn mnist_small() -> Self {
        let l = |out_channels| ConvLayer {
            out_channels,
            kernel: 3,
            stride: 2,
            pad: 1,
        };
        ConvNet {
            input: [1, 28, 28],
            convs: vec![l(8), l(16)],
            classes: 10,
        }
    }

    /// Channels, height and width after the last convolution.
    pub fn feature_shape(&self) -> [usize; 3] {
        let mut s = self.input;
        for c in &self.convs {
            s = [c.out_channels, c.out_len(s[1]), c.out_len(s[2])];
        }
        s
    }

    /// Names and shapes of the parameters, in order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![];
        let mut cin = self.input[0];
        for (i, c) in self.convs.iter().enumerate() {
            v.push((
                format!("conv{i}_w"),
                vec![c.out_channels, cin, c.kernel, c.kernel],
            ));
            v.push((format!("conv{i}_b"), vec![c.out_channels]));
            cin = c.out_channels;
        }
        let f: usize = self.feature_shape().iter().product();
        v.push(("fc_w".into(), vec![f, self.classes]));
        v.push(("fc_b".into(), vec![self.classes]));
        v
    }

    /// Fan-in of each parameter (for initialisation): `C*kh*kw` for a conv
    /// weight, the number of features for the linear weight; biases get the
    /// fan-in of their layer.
    pub fn fan_ins(&self) -> Vec<usize> {
        let mut v = vec![];
        let mut cin = self.input[0];
        for c in &self.convs {
            let fan = cin * c.kernel * c.kernel;
            v.extend([fan, fan]);
            cin = c.out_channels;
        }
        let f: usize = self.feature_shape().iter().product();
        v.extend([f, f]);
        v
    }

    /// Number of FLOPs of one forward pass on `batch` examples (2 per
    /// multiply-add of the convolutions and the linear layer).
    pub fn forward_flops(&self, batch: usize) -> u64 {
        let mut s = self.input;
        let mut flops = 0u64;
        for c in &self.convs {
            let o = [c.out_channels, c.out_len(s[1]), c.out_len(s[2])];
            flops += 2 * (batch * o[0] * o[1] * o[2] * s[0] * c.kernel * c.kernel) as u64;
            s = o;
        }
        let f: usize = s.iter().product();
        flops + 2 * (batch * f * self.classes) as u64
    }

    /// Declare the parameters as graph inputs.
    pub fn params(&self, g: &mut Graph) -> Vec<NodeId> {
        self.param_shapes()
            .iter()
            .map(|(n, s)| g.input(n, DType::F32, s))
            .collect()
    }

    /// Logits `[N, classes]` for images `x`, either flattened `[N, C*H*W]`
    /// (as MNIST batches come) or `[N, C, H, W]`.
    pub fn logits(&self, g: &mut Graph, params: &[NodeId], x: NodeId) -> NodeId {
        let n = g.shape(x)[0];
        let [c, h, w] = self.input;
        let mut h_ = g.reshape(x, &[n, c, h, w]);
        for (i, layer) in self.convs.iter().enumerate() {
            let z = g.conv2d(h_, params[2 * i], layer.params());
            let b = g.reshape(params[2 * i + 1], &[1, layer.out_channels, 1, 1]);
            let z = g.add(z, b);
            h_ = g.relu(z);
        }
        let f: usize = self.feature_shape().iter().product();
        let flat = g.reshape(h_, &[n, f]);
        let k = 2 * self.convs.len();
        let z = g.matmul(flat, params[k]);
        g.add(z, params[k + 1])
    }

    /// Mean softmax cross-entropy on images `x` and i64 `labels[N]`.
    pub fn loss(&self, g: &mut Graph, params: &[NodeId], x: NodeId, labels: NodeId) -> NodeId {
        let logits = self.logits(g, params, x);
        g.softmax_cross_entropy(logits, labels)
    }
}
