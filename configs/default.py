"""Base config: a U-Net from 2 views of 64^3 synthetic chests. Variants import and override.

python -m xct.main --config=default --workdir=/tmp/xct/default
python -m xct.main --config=default:smoke --workdir=/tmp/xct/smoke   # a few minutes
"""

from ml_collections import ConfigDict

from xct.configs import common


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # root PRNG seed: named streams init/train/data (xct.rng), each step folded in
    c.init_from = ""  # workdir whose checkpoint initialises the parameters (if this one has none)
    # xct.main calls jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)
    c.distributed = False
    c.mesh = ConfigDict({"data": -1, "spatial": 1})  # device mesh axis sizes (-1: all devices)
    # Logical array axes -> mesh axes: batches over "data", volumes split along z over "spatial"
    c.logical_axis_rules = (("batch", "data"), ("z", "spatial"))

    # The acquisition (xct.geometry.Acquisition(**config.geometry)); must match the dataset.
    c.geometry = ConfigDict()
    c.geometry.resolution = 64  # CT voxels per side = DRR pixels per side
    c.geometry.fov_mm = 400.0  # CT cube side in mm, centred on the isocentre
    c.geometry.sod_mm = 1000.0  # source to isocentre
    c.geometry.sdd_mm = 1500.0  # source to detector
    c.geometry.pixel_mm = 0.0  # detector pixel; 0: the detector just sees the inscribed cylinder
    c.geometry.arc_deg = 180.0  # the nested view angles spread over this arc

    # Training data: xct.data.TfdsSource(**config.data.tfds, ...) or
    # xct.data.RenderSource(**config.data.render, ...), each also given the acquisition, the
    # fields below and config.seed. Runs stored with the old flat fields (config.data.pool_size,
    # ...) load unchanged: xct.experiment.upgrade_config moves them into these sections.
    c.data = ConfigDict()
    c.data.source = "tfds"  # "tfds" (a built dataset) or "render" (phantoms rendered each step)
    c.data.num_views = 2  # views the model sees (<= views stored in the dataset)
    c.data.batch_size = 4  # global batch (split over the data axis)

    c.data.tfds = ConfigDict()  # source="tfds": a dataset built by data_pipelines.build
    c.data.tfds.dataset = "synthetic_chest/res64_views8"  # TFDS NAME/CONFIG
    c.data.tfds.data_dir = "~/xct_data"  # where TFDS datasets live
    c.data.tfds.split_sizes = ConfigDict()  # override split sizes when the set is auto-built
    c.data.tfds.view_selection = "first"  # "first" (nested prefix: 2 = PA + lateral) or "random"
    c.data.tfds.intensity_jitter = 0.05  # DRR scale jitter (train)
    c.data.tfds.drr_noise_std = 0.005  # Gaussian noise on normalised DRRs (train)
    c.data.tfds.worker_count = 0  # grain worker processes (0: in the main process)

    r = c.data.render = ConfigDict()  # source="render": phantoms rendered each step on device
    r.pool_size = 32  # phantoms kept on the device
    r.flip = True  # random left-right flips
    r.elastic_mm = 0.0  # elastic deformation amplitude
    r.photons = 0.0  # Poisson noise photons per pixel (0: none)
    r.curriculum_steps = 0  # deformation/noise ramp up over these steps ...
    r.complexity_curriculum = True  # ... and phantoms go from simple to full complexity
    # Real CTs mixed into the phantoms, a new patient each step (random pose, anisotropic
    # scale, smooth deformation and contrast; xct.data.RenderSource)
    r.real_ct_dir = ""  # folder of CTs (read and preprocessed as ct_folder does)
    r.real_fraction = 0.0  # share of the examples made from real CTs
    r.real_exclude = ()  # globs of names never read (the held-out CTs)
    r.real_scale = 0.15  # anisotropic scale up to +-15 %
    r.real_rotation_deg = 5.0  # rotation standard deviation per axis
    r.real_hu_gain = 0.1  # smooth contrast variation (log gain std)
    # the real CTs' cube: "" (the acquisition's fov_mm, as ct_folder) or "body" (the side the
    # body fills, io.preprocess_body_cube, as the quality table's real-chest cubes)
    r.real_fov = ""
    r.phantom_version = 1  # xct.phantoms.chest_phantom: 2 adds arms, scapulae, clavicles, ...

    c.model = ConfigDict()
    c.model.name = "unet"  # "unet" or "baseline" (xct.models.get_model)
    c.model.base_features = 16  # channels at the finest level
    c.model.num_levels = 3  # resolution levels of encoder and decoder
    c.model.num_res_blocks = 1  # residual blocks per level
    c.model.lifting = "backproject"  # "backproject" (geometry-aware) or "expand" (X2CT-style)
    c.model.fusion = "mean"  # fusion over views: "mean" or "attention"
    c.model.attention = "bottleneck"  # "bottleneck", "gates" or "none"
    c.model.seg_classes = 0  # >0: joint organ segmentation head

    c.disc = ConfigDict()
    c.disc.name = "patchgan"  # discriminator (used when adversarial weights are > 0)
    c.disc.base_features = 16  # channels of its first layer

    c.loss = ConfigDict()
    c.loss.l1 = 1.0  # L1 on the normalised volume
    c.loss.mse = 0.0  # MSE on the normalised volume
    c.loss.ssim = 0.1  # 1 - 3D SSIM
    c.loss.gradient = 0.0  # L1 of finite-difference gradients
    c.loss.projection = 0.1  # L1 between DRRs of the prediction and the input DRRs
    c.loss.projection_extra_views = 0  # random extra angles compared with the true CT's DRRs
    c.loss.seg = 0.0  # cross-entropy of the segmentation head
    c.loss.adversarial = 0.0  # adversarial generator loss (gan_kind)
    c.loss.feature_matching = 0.0  # discriminator feature matching
    c.loss.gan_kind = "lsgan"  # "lsgan" (least squares) or "hinge" adversarial losses
    c.loss.perceptual = 0.0  # feature L1 of a frozen organ segmenter (losses.perceptual)
    c.loss.perceptual_net = ""  # its folder (python -m scripts.train_segmenter --out DIR)

    c.optim = ConfigDict()
    c.optim.learning_rate = 2e-3  # peak AdamW learning rate
    c.optim.warmup_steps = 100  # linear warm-up, then cosine decay to 1%
    c.optim.weight_decay = 1e-4  # AdamW decoupled weight decay
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.99  # Adam beta2
    c.optim.grad_clip = 1.0  # global-norm gradient clipping
    c.optim.ema_decay = 0.99  # EMA of parameters (evaluated and exported)
    c.optim.disc_learning_rate = 2e-4  # discriminator Adam learning rate

    c.train = ConfigDict()
    c.train.num_steps = 5000  # optimisation steps
    c.train.log_every = 50  # steps between progress lines / metric rows
    c.train.eval_every = 500  # steps between validations (best checkpoint by PSNR)
    c.train.checkpoint_every = 500  # steps between checkpoints
    c.train.keep_checkpoints = 3  # last checkpoints kept
    c.train.max_seconds = 0.0  # stop (after saving) once training ran this long; 0: no limit
    c.train.on_nonfinite = "stop"  # NaN/inf loss or gradient: "stop" (one line) or "skip" the step
    c.train.patch_size = 0  # >0: train on random P^3 patches, evaluate by sliding windows
    c.train.patch_overlap = 8  # sliding-window overlap in voxels (patch models)
    c.train.stages = ""  # progressive: "64:2000,128:1000[:batch],..." (one run per stage)

    c.eval = ConfigDict()
    c.eval.batch_size = 4  # evaluation batch
    c.eval.split = "test"  # split for --mode=evaluate
    c.eval.num_views = 0  # 0: as trained
    c.eval.save_volumes = 8  # volumes written as NIfTI (prediction + ground truth); -1: all
    c.eval.report_volumes = 3  # volumes shown in report.html (spread evenly over the list)
    c.eval.report_ids = ()  # or exactly these volume ids (e.g. ("chest.nii.gz",))
    return common.apply_arg(c, arg)
