// The service's MNIST preprocessing (mnist_api/imaging/preprocessing.py), in the browser: decoded RGBA
// pixels in, the model's 28x28 float32 input out (ink = 1). Same steps in the same order:
// choose the working scale, greyscale (alpha composited onto white), make the digit light on
// dark from the border's median, keep only ink above a quarter of the contrast, crop to it,
// scale its longer side to 20 px with Pillow's own Lanczos filter (fixed-point, as Pillow
// computes it), normalise by the peak and move the centre of mass to the centre of 28x28.
// float32 steps are rounded with Math.fround where NumPy works in float32, and Python's
// round() (half to even) is used where the server uses it. tests/e2e/test_page_device.py holds
// the two implementations together on 600 drawings and uploads.
"use strict";

export const MNIST_SIZE = 28;
const DIGIT_BOX = 20;
const MIN_DIGIT_PIXELS = 48;
const MIN_CONTRAST = 24.0;
const INK_FLOOR = 0.25;
// mnist_api/imaging/decoding.py: the working image's shorter side, its pixel cap, libjpeg's 1/8.
const WORK_SHORT_SIDE = 256;
const MAX_WORK_PIXELS = 4000000;
const MAX_DRAFT_SCALE = 8;
// Pillow's Resample.c: coefficients in fixed point with this many fraction bits (8-bit images).
const PRECISION_BITS = 32 - 8 - 2;

const f32 = Math.fround;

export class BlankImage extends Error {
  constructor() {
    super("no digit in the image");
    this.code = "blank_image";
  }
}

// Python's round(): halves go to the even neighbour.
export function roundHalfEven(x) {
  const r = Math.round(x);
  if (Math.abs(x % 1) === 0.5) return 2 * Math.round(x / 2);
  return r;
}

// ---- working scale (decoding.coarsest_scale / _finer_scale) ----

function workPixels(width, height, scale) {
  return Math.ceil(width / scale) * Math.ceil(height / scale);
}

export function coarsestScale(width, height) {
  const short = Math.min(width, height);
  let scale = 1;
  while (scale < MAX_DRAFT_SCALE && Math.floor(short / (scale * 2)) >= WORK_SHORT_SIDE) scale *= 2;
  while (workPixels(width, height, scale) > MAX_WORK_PIXELS) scale *= 2;
  return scale;
}

function finerScale(width, height, scale, digitPixels) {
  while (scale > 1 && digitPixels < MIN_DIGIT_PIXELS) {
    const finer = Math.floor(scale / 2);
    if (workPixels(width, height, finer) > MAX_WORK_PIXELS) break;
    scale = finer;
    digitPixels *= 2;
  }
  return scale;
}

// ---- greyscale and alpha ----

// Pillow's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point.
function luma(r, g, b) {
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
}

// Pillow's alpha_composite of a pixel over opaque white (AlphaComposite.c, 7 bits of precision).
function overWhite(c, a) {
  const tmp = c * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
  return (((tmp >>> 8) + tmp) >>> 8) >>> 7;
}

// The grey image (alpha composited onto white) and, if any pixel is not opaque, the alpha.
function greyAndAlpha(rgba, count) {
  const grey = new Uint8Array(count);
  let alpha = null;
  for (let i = 0, p = 0; i < count; i++, p += 4) {
    const a = rgba[p + 3];
    if (a === 255) {
      grey[i] = luma(rgba[p], rgba[p + 1], rgba[p + 2]);
    } else {
      if (alpha === null) {
        alpha = new Uint8Array(count).fill(255);
      }
      alpha[i] = a;
      grey[i] = a === 0 ? 255 : luma(overWhite(rgba[p], a), overWhite(rgba[p + 1], a), overWhite(rgba[p + 2], a));
    }
  }
  return { grey, alpha };
}

// Box-average `channels`-channel pixels by `factor` (Pillow's Image.reduce; partial boxes at
// the right and bottom edges average what they hold).
function reduce(pixels, width, height, channels, factor) {
  const outW = Math.ceil(width / factor);
  const outH = Math.ceil(height / factor);
  const out = new Uint8Array(outW * outH * channels);
  const sums = new Float64Array(channels);
  for (let oy = 0; oy < outH; oy++) {
    const y0 = oy * factor;
    const y1 = Math.min(height, y0 + factor);
    for (let ox = 0; ox < outW; ox++) {
      const x0 = ox * factor;
      const x1 = Math.min(width, x0 + factor);
      sums.fill(0);
      for (let y = y0; y < y1; y++) {
        let p = (y * width + x0) * channels;
        for (let x = x0; x < x1; x++) {
          for (let c = 0; c < channels; c++) sums[c] += pixels[p + c];
          p += channels;
        }
      }
      const area = (y1 - y0) * (x1 - x0);
      const o = (oy * outW + ox) * channels;
      for (let c = 0; c < channels; c++) out[o + c] = Math.floor((sums[c] + (area >> 1)) / area);
    }
  }
  return { pixels: out, width: outW, height: outH };
}

// RGBA reduced as Pillow reduces it: premultiplied ("RGBa"), then back to straight alpha.
function reduceRgba(rgba, width, height, factor) {
  const count = width * height;
  const premultiplied = new Uint8Array(count * 4);
  for (let p = 0; p < count * 4; p += 4) {
    const a = rgba[p + 3];
    for (let c = 0; c < 3; c++) premultiplied[p + c] = Math.floor((rgba[p + c] * a + 127) / 255);
    premultiplied[p + 3] = a;
  }
  const reduced = reduce(premultiplied, width, height, 4, factor);
  const px = reduced.pixels;
  for (let p = 0; p < px.length; p += 4) {
    const a = px[p + 3];
    for (let c = 0; c < 3; c++) px[p + c] = a === 0 ? 0 : Math.min(255, Math.floor((px[p + c] * 255 + (a >> 1)) / a));
  }
  return reduced;
}

// ---- the ink (preprocessing._crop_ink_of_bytes) ----

function borderMedian(grey, width, height) {
  const border = [];
  for (let x = 0; x < width; x++) border.push(grey[x]);
  for (let x = 0; x < width; x++) border.push(grey[(height - 1) * width + x]);
  for (let y = 0; y < height; y++) border.push(grey[y * width]);
  for (let y = 0; y < height; y++) border.push(grey[y * width + width - 1]);
  border.sort((a, b) => a - b);
  const half = border.length / 2;
  return (border[half - 1] + border[half]) / 2;
}

// The digit as 8-bit light-on-dark ink cropped to its bounding box, or null if no ink.
export function cropInk(grey, width, height) {
  const background = borderMedian(grey, width, height);
  const darkInk = background > 127.5;
  const inkBackground = darkInk ? 255 - background : background;
  let lo = 255;
  let hi = 0;
  for (let i = 0; i < grey.length; i++) {
    const v = grey[i];
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  const strongest = darkInk ? 255 - lo : hi;
  const contrast = strongest - inkBackground;
  if (contrast < MIN_CONTRAST) return null;
  // Ink strength of every grey value (float32, as NumPy computes it in place).
  const inkByGrey = new Float32Array(256);
  const contrast32 = f32(contrast);
  for (let v = 0; v < 256; v++) {
    let x = darkInk ? 255 - v : v;
    x = f32(x - inkBackground);
    x = f32(x / contrast32);
    x = f32(x - INK_FLOOR);
    x = f32(x / (1 - INK_FLOOR));
    inkByGrey[v] = Math.min(1, Math.max(0, x));
  }
  let weakest = -1;
  for (let v = 0; v < 256; v++) {
    if (inkByGrey[v] > 0) {
      if (darkInk) weakest = v; // the lightest grey that still is ink
      else if (weakest < 0) weakest = v; // the darkest grey that is ink
    }
  }
  if (weakest < 0) return null;
  let top = height;
  let bottom = -1;
  let left = width;
  let right = -1;
  for (let y = 0; y < height; y++) {
    const row = y * width;
    for (let x = 0; x < width; x++) {
      const v = grey[row + x];
      if (darkInk ? v <= weakest : v >= weakest) {
        if (y < top) top = y;
        bottom = y;
        if (x < left) left = x;
        if (x > right) right = x;
      }
    }
  }
  if (bottom < 0) return null;
  const bytes = new Uint8Array(256);
  for (let v = 0; v < 256; v++) bytes[v] = roundHalfEven(f32(inkByGrey[v] * 255));
  const w = right - left + 1;
  const h = bottom - top + 1;
  const digit = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) digit[y * w + x] = bytes[grey[(y + top) * width + x + left]];
  }
  return { pixels: digit, width: w, height: h };
}

// ---- Pillow's Lanczos resize of an 8-bit image (Resample.c) ----

function sinc(x) {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function lanczos(x) {
  return x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0;
}

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 3 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    const k = new Float64Array(xmax);
    for (let x = 0; x < xmax; x++) {
      k[x] = lanczos((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x] / ww : k[x];
      const fixed = w * (1 << PRECISION_BITS);
      kk[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + fixed) : Math.trunc(0.5 + fixed);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(ss) {
  if (ss >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (ss <= 0) return 0;
  return Math.floor(ss / 2 ** PRECISION_BITS);
}

// Pillow 13 runs the vertical pass first for tall images being shrunk (measured against
// Image.resize on 1,355 digit-shaped resizes: this rule picks its order in all but 4, near
// the boundary, where the two orders differ by a few grey levels).
export function resizeLanczos(src, width, height, outW, outH) {
  if (outW === width && outH === height) return src.slice();
  if (outW !== width && outH !== height && height > 2 * width && height > outH) {
    const tall = resizePasses(src, width, height, width, outH);
    return resizePasses(tall, width, outH, outW, outH);
  }
  return resizePasses(src, width, height, outW, outH);
}

// Horizontal pass (on the rows the vertical pass will read), then vertical: Resample.c.
function resizePasses(src, width, height, outW, outH) {
  if (outW === width && outH === height) return src.slice();
  const horiz = coefficients(width, outW);
  const vert = coefficients(height, outH);
  const yFirst = vert.bounds[0];
  const yLast = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
  let image = src;
  let imageW = width;
  let rowOffset = 0; // the horizontal pass keeps only the rows the vertical pass reads
  if (outW !== width) {
    const rows = yLast - yFirst;
    const temp = new Uint8Array(outW * rows);
    for (let y = 0; y < rows; y++) {
      const row = (y + yFirst) * width;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = horiz.bounds[xx * 2];
        const xmax = horiz.bounds[xx * 2 + 1];
        const k = xx * horiz.ksize;
        let ss = 2 ** (PRECISION_BITS - 1);
        for (let x = 0; x < xmax; x++) ss += src[row + x + xmin] * horiz.kk[k + x];
        temp[y * outW + xx] = clip8(ss);
      }
    }
    image = temp;
    imageW = outW;
    rowOffset = yFirst;
  }
  if (outH === height) return image;
  const out = new Uint8Array(outW * outH);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = vert.bounds[yy * 2] - rowOffset;
    const ymax = vert.bounds[yy * 2 + 1];
    const k = yy * vert.ksize;
    for (let xx = 0; xx < outW; xx++) {
      let ss = 2 ** (PRECISION_BITS - 1);
      for (let y = 0; y < ymax; y++) ss += image[(y + ymin) * imageW + xx] * vert.kk[k + y];
      out[yy * outW + xx] = clip8(ss);
    }
  }
  return out;
}

// ---- the 28x28 field (preprocessing._to_mnist_field) ----

export function toMnistField(digit) {
  if (digit === null) throw new BlankImage();
  const { width, height } = digit;
  const ratio = DIGIT_BOX / Math.max(height, width);
  const newW = Math.max(1, roundHalfEven(width * ratio));
  const newH = Math.max(1, roundHalfEven(height * ratio));
  const resized = resizeLanczos(digit.pixels, width, height, newW, newH);
  let peak = 0;
  for (const v of resized) if (v > peak) peak = v;
  if (peak <= 0) throw new BlankImage();
  const peak32 = f32(peak);
  const patch = new Float32Array(newW * newH);
  let total = 0;
  let sumY = 0;
  let sumX = 0;
  for (let y = 0; y < newH; y++) {
    for (let x = 0; x < newW; x++) {
      const v = f32(resized[y * newW + x] / peak32);
      patch[y * newW + x] = v;
      total += v;
      sumY += v * y;
      sumX += v * x;
    }
  }
  const middle = (MNIST_SIZE - 1) / 2;
  const top = Math.min(Math.max(roundHalfEven(middle - sumY / total), 0), MNIST_SIZE - newH);
  const left = Math.min(Math.max(roundHalfEven(middle - sumX / total), 0), MNIST_SIZE - newW);
  const field = new Float32Array(MNIST_SIZE * MNIST_SIZE);
  for (let y = 0; y < newH; y++) {
    for (let x = 0; x < newW; x++) field[(y + top) * MNIST_SIZE + x + left] = patch[y * newW + x];
  }
  return field;
}

// ---- the whole recipe ----

// The digit of decoded pixels seen at 1/scale (null if blank). `jpeg`: libjpeg's reduced
// decode gives grey straight away, so the reduction averages grey rather than colour.
function digitAtScale(rgba, width, height, scale, jpeg) {
  let grey;
  let alpha;
  let w = width;
  let h = height;
  if (scale === 1) {
    ({ grey, alpha } = greyAndAlpha(rgba, width * height));
  } else if (jpeg) {
    const full = greyAndAlpha(rgba, width * height).grey;
    ({ pixels: grey, width: w, height: h } = reduce(full, width, height, 1, scale));
    alpha = null;
  } else {
    const reduced = reduceRgba(rgba, width, height, scale);
    w = reduced.width;
    h = reduced.height;
    ({ grey, alpha } = greyAndAlpha(reduced.pixels, w * h));
  }
  let digit = cropInk(grey, w, h);
  if (digit === null && alpha !== null) digit = cropInk(alpha, w, h); // strokes on a transparent canvas
  return digit;
}

// RGBA pixels (as getImageData gives them, already upright) -> Float32Array(784), ink = 1.
// Throws BlankImage when there is no digit.
export function mnistInput(rgba, width, height, { jpeg = false } = {}) {
  const scale = coarsestScale(width, height);
  const digit = digitAtScale(rgba, width, height, scale, jpeg);
  if (digit !== null && scale > 1 && Math.max(digit.width, digit.height) < MIN_DIGIT_PIXELS) {
    // A small digit in a big image: look again with enough pixels for its strokes.
    const finer = finerScale(width, height, scale, Math.max(digit.width, digit.height));
    if (finer !== scale) return toMnistField(digitAtScale(rgba, width, height, finer, jpeg));
  }
  return toMnistField(digit);
}
